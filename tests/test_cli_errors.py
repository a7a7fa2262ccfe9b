"""Every bad input to `fmn generate`: one-line `error: ...`, exit code 2, nothing written."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.models import load_pipeline, save_single_file

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tiny_pipeline_dir, tmp_path_factory):
    """Inputs shared by the cases: a real folder, a good and a damaged checkpoint, pickles."""
    root = tmp_path_factory.mktemp("inputs")
    folder = tiny_pipeline_dir("sd1")
    good = save_single_file(load_pipeline(folder, device="cpu"), root / "good.safetensors")
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "corrupt.safetensors").write_bytes(b"\x00garbage" * 64)
    (root / "header_only.safetensors").write_bytes(data[:8])
    for name in ("m.ckpt", "m.pt", "m.bin"):
        (root / name).write_bytes(b"not really a pickle")
    (root / "not_a_pipeline").mkdir()
    (root / "not_a_pipeline" / "readme.txt").write_text("hello")
    return {"root": root, "folder": folder}


CASES = [
    # (id, extra args with {root}/{folder} placeholders, expected message fragment)
    ("missing path", ["--model", "{root}/nope.safetensors"], "no such file or folder"),
    ("missing plain name", ["--model", "no_such_model_dir"], "no such file or folder"),
    ("not a pipeline", ["--model", "{root}/not_a_pipeline"], "not a diffusers pipeline"),
    ("ckpt pickle", ["--model", "{root}/m.ckpt"], "--allow-pickle"),
    ("pt pickle", ["--model", "{root}/m.pt"], "--allow-pickle"),
    ("bin pickle", ["--model", "{root}/m.bin"], "--allow-pickle"),
    ("truncated", ["--model", "{root}/truncated.safetensors", "--config", "{folder}"], "truncated"),
    ("corrupt", ["--model", "{root}/corrupt.safetensors", "--config", "{folder}"], "corrupt"),
    ("header only", ["--model", "{root}/header_only.safetensors"], "corrupt"),
    ("unknown device", ["--model", "{folder}", "--device", "gpu0"], "unknown device"),
    ("unknown dtype", ["--model", "{folder}", "--dtype", "float8"], "unknown dtype"),
    ("zero n", ["--model", "{folder}", "--n", "0"], "--n must be a positive integer"),
    ("negative n", ["--model", "{folder}", "--n", "-3"], "--n must be a positive integer"),
    ("zero steps", ["--model", "{folder}", "--steps", "0"], "--steps must be a positive integer"),
    ("zero batch", ["--model", "{folder}", "--batch-size", "0"], "--batch-size must be"),
    ("odd size", ["--model", "{folder}", "--size", "15"], "multiple of this model's VAE factor"),
    ("zero size", ["--model", "{folder}", "--size", "0"], "--size must be 1..4096"),
    ("hub offline", ["--model", "nobody-here/no-such-model"], "model hub"),
    ("bad config", ["--model", "{root}/good.safetensors", "--config", "{root}"], "--config"),
    ("missing patch", ["--model", "{folder}", "--patch", "{root}/none.safetensors"], "patch"),
]


def _expand(args, files):
    return [a.format(root=files["root"], folder=files["folder"]) for a in args]


def _assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(args, fragment, files, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [
        "generate",
        "--prompt",
        "a star",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out_dir / "grid.png"),
        *_expand(args, files),
    ]
    result = runner.invoke(app, cmd)
    _assert_one_line_error(result, fragment)
    assert list(out_dir.iterdir()) == []


def test_output_folder_missing(files, tmp_path):
    out = tmp_path / "absent" / "grid.png"
    result = runner.invoke(
        app, ["generate", "--prompt", "x", "--model", str(files["folder"]), "--out", str(out)]
    )
    _assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "absent").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_output_folder_not_writable(files, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        result = runner.invoke(
            app,
            [
                "generate",
                "--prompt",
                "x",
                "--model",
                str(files["folder"]),
                "--out",
                str(ro / "grid.png"),
            ],
        )
        _assert_one_line_error(result, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_output_folder_not_writable_simulated(files, tmp_path, monkeypatch):
    """Root ignores permission bits, so also check the message with access() denied."""
    import forget_me_not.files as files_module

    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files_module.tempfile, "mkstemp", refused)
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "x",
            "--model",
            str(files["folder"]),
            "--out",
            str(out_dir / "grid.png"),
        ],
    )
    _assert_one_line_error(result, "not writable")
    assert list(out_dir.iterdir()) == []


def test_pickle_with_consent_warns(files, tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "real.ckpt"
    torch.save({"state_dict": load_file(files["root"] / "good.safetensors")}, ckpt)
    out = tmp_path / "grid.png"
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "x",
            "--model",
            str(ckpt),
            "--config",
            str(files["folder"]),
            "--allow-pickle",
            "--n",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_debug_shows_traceback(files, tmp_path, monkeypatch):

    monkeypatch.setenv("FMN_DEBUG", "1")
    result = runner.invoke(
        app, ["generate", "--prompt", "x", "--model", "nope_dir", "--out", str(tmp_path / "g.png")]
    )
    assert result.exit_code == 2  # the code stays; the traceback comes with it
    assert "Traceback" in result.stderr and "FmnError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
