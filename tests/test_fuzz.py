"""Bad and odd input through the real entry point: exit code, one `error:` line, nothing left.

Table-driven for the cases a QA pass found, property-based (Hypothesis) for random bytes and
headers as patches and random numbers for numeric settings.
"""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from forget_me_not.cli.main import main
from forget_me_not.errors import FmnError
from forget_me_not.patch import Patch, load_patch

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _patch(tmp_path, name="p", value=0.1, version=None) -> str:
    tensors = {"text_encoder.token_ids": torch.tensor([3]),
               "text_encoder.token_delta": torch.full((1, 32), value)}
    path = Patch("embedding", tensors, {"concepts": [{"name": "star"}]}, None, name).save(
        tmp_path / f"{name}.safetensors")
    if version is not None:  # rewrite the header's format version
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = dict(f.metadata())
        meta = json.loads(header["forget_me_not"])
        meta["format_version"] = version
        header["forget_me_not"] = json.dumps(meta)
        save_file(tensors, str(path), metadata=header)
    return str(path)


def _files(folder):
    return sorted(p.name for p in folder.rglob("*"))


CASES = [
    # (id, argv with {tmp}, expected code, fragment)
    ("out under /proc", ["forget", "--concept", "star", "--out", "/proc/p.safetensors"], 2,
     "not writable"),
    ("generate out under /proc", ["generate", "--prompt", "a star", "--out", "/proc/g.png"], 2,
     "not writable"),
    ("out parent is a file", ["forget", "--concept", "star", "--out",
                              "{tmp}/file.txt/p.safetensors"], 2, "which is a file"),
    ("huge generate size", ["generate", "--prompt", "a star", "--size", "100000", "--out",
                            "{tmp}/g.png"], 2, "--size must be 1..4096"),
    ("huge render size", ["world", "render", "--caption", "a red star", "--size", "100000",
                          "--out", "{tmp}/r.png"], 2, "renderer's 1024"),
    ("nan guidance", ["generate", "--prompt", "a star", "--guidance", "nan", "--out",
                      "{tmp}/g.png"], 2, "--guidance must be a finite number"),
    ("negative guidance", ["generate", "--prompt", "a star", "--guidance", "-1", "--out",
                           "{tmp}/g.png"], 2, "--guidance must be"),
    ("steps not a number", ["forget", "--concept", "star", "--steps", "abc", "--out",
                            "{tmp}/p.safetensors"], 2, "valid integer"),
    ("unknown option", ["forget", "--concept", "star", "--train", "lora", "--out",
                        "{tmp}/p.safetensors"], 2, "No such option"),
    ("patch info on a folder", ["patch", "info", "{tmp}"], 2, "is a folder"),
    ("unknown recipe", ["forget", "--concept", "star", "--recipe", "magic", "--out",
                        "{tmp}/p.safetensors"], 2, "unknown recipe"),
    ("set on an unknown key", ["forget", "--concept", "star", "--set", "magic=1", "--out",
                               "{tmp}/p.safetensors"], 2, "valid keys"),
    ("images that are not images", ["forget", "--concept", "star", "--images", "{tmp}",
                                    "--out", "{tmp}/p.safetensors"], 2, "not readable images"),
    ("paper without images", ["forget", "--concept", "star", "--recipe", "paper", "--out",
                              "{tmp}/p.safetensors"], 2, "trains on reference images"),
    ("paper on the embedded model", ["forget", "--concept", "star", "--recipe", "paper",
                                     "--images", "{tmp}/imgs", "--out", "{tmp}/p.safetensors"],
     2, "written for sd1/sd2"),
]


@pytest.mark.parametrize("argv,code,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, code, fragment):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    before = _files(tmp_path)
    got, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == code, err
    assert fragment in _one_error(err)
    assert _files(tmp_path) == before


def test_damaged_patches_are_refused_where_they_are_read(tmp_path, capsys):
    bad = _patch(tmp_path, "nan", value=float("nan"))
    newer = _patch(tmp_path, "newer", version=99)
    good = _patch(tmp_path, "good")
    for argv, fragment in ((["patch", "info", bad], "non-finite values (NaN or Inf) in "
                            "text_encoder.token_delta"),
                           (["generate", "--prompt", "a star", "--patch", bad, "--out",
                             str(tmp_path / "g.png")], "non-finite"),
                           (["patch", "stack", bad, good, "--out", str(tmp_path / "s.safetensors")],
                            "non-finite"),
                           (["patch", "info", newer], "newer than this forget-me-not reads"),
                           (["patch", "stack", good, good, "--out",
                             str(tmp_path / "s.safetensors")], "given twice")):
        code, err = _run(capsys, *argv)
        assert code == 2 and fragment in _one_error(err), err
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "g.png").exists()


def test_interrupts_exit_130_with_one_line_and_debug_keeps_the_code(tmp_path, capsys,
                                                                    monkeypatch):
    import forget_me_not.bench.runner as runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_bench", interrupted)
    code, err = _run(capsys, "bench", "--suite", "world", "--out", str(tmp_path / "b"))
    assert code == 130 and "interrupted" in _one_error(err)
    monkeypatch.setenv("FMN_DEBUG", "1")
    code, err = _run(capsys, "patch", "info", str(tmp_path / "none.safetensors"))
    assert code == 2 and "Traceback" in err and err.strip().endswith("patch")


def test_outputs_get_the_mode_the_umask_gives(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        path = _patch(tmp_path, "mode")
        code, _ = _run(capsys, "world", "render", "--caption", "a red star", "--out",
                       str(tmp_path / "r.png"))
        assert code == 0
        from forget_me_not.bench.leaderboard import write_leaderboard

        row = {"rank": 1, "entry": "a", "method": "m", "target": "t", "m_score": 0.0,
               "retention_min": 1.0, "below": []}
        write_leaderboard([row], tmp_path, {"suite": "s"})
    finally:
        os.umask(old)
    for name in ("mode.safetensors", "r.png", "leaderboard.md", "leaderboard.png"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o644), name
    assert Path(path).exists()


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_are_never_a_patch(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(FmnError):
        load_patch(path)


@FAST
@given(header=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_random_safetensors_headers_are_refused(tmp_path, header):
    path = tmp_path / "header.safetensors"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(FmnError):
        load_patch(path)


@FAST
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_any_number_for_a_numeric_setting_is_taken_or_refused_in_one_error(value):
    from forget_me_not import recipes

    recipe = recipes.load("paper-lora")
    for key in ("lr", "weight_decay", "preserve_weight", "max_grad_norm"):
        try:
            config = recipe.configs(False, [f"{key}={value!r}"])[0]
        except FmnError as err:
            assert "\n" not in str(err)
        else:
            taken = getattr(config, key)
            assert math.isfinite(taken) and taken >= 0


from pathlib import Path  # noqa: E402  (used by the umask test)


def test_a_patch_passed_as_the_model_is_named_as_a_patch(tmp_path, capsys):
    path = _patch(tmp_path, "asmodel")
    code, err = _run(capsys, "generate", "--prompt", "a star", "--model", path, "--out",
                     str(tmp_path / "g.png"))
    assert code == 2 and "is a forget-me-not patch, not a model" in _one_error(err)


def test_a_prompt_past_the_encoder_length_warns():
    from forget_me_not.generation import warn_if_cut
    from tiny_pipelines import make_tiny_pipeline

    pipe = make_tiny_pipeline("sd1")
    with pytest.warns(UserWarning, match="the rest is cut"):
        warn_if_cut(pipe, " ".join(["star"] * 200))


def test_model_and_world_inputs_that_used_to_mislead(tiny_pipeline_dir, tmp_path, capsys):
    from forget_me_not.models import load_pipeline, save_single_file

    sd1 = save_single_file(load_pipeline(tiny_pipeline_dir("sd1")), tmp_path / "sd1.safetensors")
    for argv, fragment in (
        (["generate", "--prompt", "a star", "--model", str(sd1), "--config",
          str(tiny_pipeline_dir("sdxl")), "--out", str(tmp_path / "g.png")],
         "is a sdxl pipeline but sd1.safetensors is a sd1 checkpoint"),
        (["world", "render", "--caption", "a red star with a banana", "--out",
          str(tmp_path / "r.png")], "no word 'banana'"),
        (["correct", "--concept", "wizard", "--away-from", "milka", "--judge-model",
          "missing_clip", "--out", str(tmp_path / "c.safetensors")], "not a folder"),
    ):
        code, err = _run(capsys, *argv)
        assert code == 2 and fragment in _one_error(err), err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "r.png").exists()
