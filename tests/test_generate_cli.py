"""`fmn generate` end to end on the tiny pipelines (typer's CliRunner, real library)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.models import load_pipeline, save_single_file

runner = CliRunner()
FAST = ["--steps", "2", "--device", "cpu"]


def _run(*args: str):
    return runner.invoke(app, ["generate", *args])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_each_family(tiny_pipeline_dir, family, tmp_path):
    out = tmp_path / "grid.png"
    result = _run(
        "--model",
        str(tiny_pipeline_dir(family)),
        "--prompt",
        "a red star",
        "--n",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    for i in range(3):
        assert Image.open(tmp_path / f"grid_{i}.png").size == (16, 16)
    assert Image.open(out).text["prompt"] == "a red star"
    assert not list(tmp_path.glob("*.tmp"))


def test_same_seed_same_pixels_whatever_the_batch(tiny_pipeline_dir, tmp_path):
    model = str(tiny_pipeline_dir("sd1"))
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = ["--model", model, "--prompt", "a cat", "--n", "2", *FAST]
    assert _run(*common, "--seed", "7", "--batch-size", "2", "--out", str(a)).exit_code == 0
    assert _run(*common, "--seed", "7", "--batch-size", "1", "--out", str(b)).exit_code == 0
    assert _run(*common, "--seed", "8", "--batch-size", "1", "--out", str(c)).exit_code == 0
    for i in range(2):
        assert np.array_equal(_pixels(tmp_path / f"a_{i}.png"), _pixels(tmp_path / f"b_{i}.png"))
    # seed 8's first sample is seed 7's second one: sample i always uses seed + i
    assert np.array_equal(_pixels(tmp_path / "a_1.png"), _pixels(tmp_path / "c_0.png"))
    assert not np.array_equal(_pixels(tmp_path / "a_0.png"), _pixels(tmp_path / "c_0.png"))


def test_generate_from_single_file(tiny_pipeline_dir, family, tmp_path):
    folder = tiny_pipeline_dir(family)
    ckpt = save_single_file(load_pipeline(folder, device="cpu"), tmp_path / "m.safetensors")
    ref, got = tmp_path / "ref.png", tmp_path / "got.png"
    common = ["--prompt", "a dog", "--n", "1", *FAST]
    assert _run("--model", str(folder), *common, "--out", str(ref)).exit_code == 0
    result = _run("--model", str(ckpt), "--config", str(folder), *common, "--out", str(got))
    assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(tmp_path / "ref_0.png"), _pixels(tmp_path / "got_0.png"))


def test_size_and_negative(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "g.png"
    result = _run(
        "--model",
        str(tiny_pipeline_dir("sd2")),
        "--prompt",
        "a moon",
        "--n",
        "1",
        "--negative",
        "blurry",
        "--size",
        "24",
        "--out",
        str(out),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g_0.png").size == (24, 24)


def test_patch_is_applied(tiny_pipeline_dir, tmp_path, monkeypatch):
    import sys
    import types

    applied = []

    class FakePatch:
        def apply(self, pipe, scale=1.0):
            applied.append(pipe.fmn_family)

    fake = types.ModuleType("forget_me_not.patch")
    fake.load_patch = lambda path: FakePatch()
    monkeypatch.setitem(sys.modules, "forget_me_not.patch", fake)
    patch_file = tmp_path / "p.safetensors"
    patch_file.write_bytes(b"x")
    result = _run(
        "--model",
        str(tiny_pipeline_dir("sd1")),
        "--prompt",
        "a star",
        "--n",
        "1",
        "--patch",
        str(patch_file),
        "--out",
        str(tmp_path / "g.png"),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert applied == ["sd1"]
