"""`fmn forget` and `fmn invert` through the CLI: the happy path and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from forget_me_not.attention import ProbeSet
from forget_me_not.cli.main import app
from forget_me_not.patch import load_patch

runner = CliRunner()


def _images(folder, n=2, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("forget_inputs")
    good = _images(root / "good")
    (root / "empty").mkdir()
    broken = _images(root / "broken")
    (broken / "notes.txt").write_text("not an image")
    (broken / "half.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    small = _images(root / "small", size=8)
    return {"root": root, "sd1": tiny_pipeline_dir("sd1"), "sdxl": tiny_pipeline_dir("sdxl"),
            "good": good, "empty": root / "empty", "broken": broken, "small": small}


def _forget(inputs, out, *extra):
    args = ["forget", "--model", str(inputs["sd1"]), "--concept", "star", "--steps", "2",
            "--device", "cpu", "--out", str(out), *extra]
    return runner.invoke(app, args)


def _assert_error(result, fragment):
    assert result.exit_code == 2, result.output
    # The progress bar may have drawn on stderr before; the error is one line, and the last.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("source", [[], ["--no-real-image"], ["--images", "{good}"]])
def test_forget_writes_a_patch(inputs, tmp_path, source):
    out = tmp_path / "p.safetensors"
    extra = [s.format(**{k: str(v) for k, v in inputs.items()}) for s in source]
    if not extra:
        extra = ["--self-generate", "1"]
    result = _forget(inputs, out, *extra)
    assert result.exit_code == 0, result.output
    patch = load_patch(out)
    assert patch.kind == "lora" and patch.metadata["steps"] == 2
    assert patch.metadata["concepts"][0]["name"] == "star"
    assert list(tmp_path.iterdir()) == [out]


def test_forget_with_an_anchor_pulls_toward_it(inputs, tmp_path):
    out = tmp_path / "p.safetensors"
    result = _forget(inputs, out, "--no-real-image", "--set", "anchor=moon", "--set",
                     "concept_anchor_weight=5", "--set", "weight_decay=0.5")
    assert result.exit_code == 0, result.output
    meta = load_patch(out).metadata
    assert meta["concepts"][0]["anchor"] == "moon"
    assert meta["settings"]["concept_anchor_weight"] == 5.0
    assert meta["settings"]["weight_decay"] == 0.5
    assert len(meta["term_losses"]["concept_anchor"]) == 2


CASES = [
    ("absent word", ["--concept", "qwxz"], "fmn invert"),
    ("empty anchor", ["--set", "anchor= "], "anchor is empty"),
    ("negative anchor weight", ["--set", "anchor=moon", "--set", "concept_anchor_weight=-1"],
     "concept_anchor_weight"),
    ("unknown set key", ["--set", "magic=1"], "valid keys"),
    ("set without value", ["--set", "lr"], "KEY=VALUE"),
    ("wrong set type", ["--set", "lora_rank=many"], "lora_rank must be an integer"),
    ("unknown method", ["--method", "magic"], "unknown method"),
    ("unknown recipe", ["--recipe", "magic"], "unknown recipe"),
    ("paper needs images", ["--recipe", "paper"], "reference images"),
    ("bad category", ["--category", "animal"], "--category"),
    ("two sources", ["--no-real-image", "--self-generate", "2"], "choose one of"),
    ("empty folder", ["--images", "{empty}"], "is empty"),
    ("missing folder", ["--images", "{root}/nope"], "does not exist"),
    ("unreadable files", ["--images", "{broken}"], "notes.txt"),
    ("small images", ["--images", "{small}"], "smaller than the model's 16 px"),
    ("bad train", ["--set", "train=everything"], "unknown train"),
    ("zero steps", ["--steps", "0"], "steps must be an integer >= 1"),
    ("bad lr", ["--lr", "-1"], "learning rate"),
    ("negative weight decay", ["--set", "weight_decay=-1"], "weight_decay must be a number"),
    ("bad out suffix", ["--out", "{root}/p.bin"], ".safetensors"),
    ("missing out dir", ["--out", "{root}/none/p.safetensors"], "does not exist"),
]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forget_bad_input(inputs, tmp_path, args, fragment):
    out = tmp_path / "p.safetensors"
    extra = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in args]
    result = _forget(inputs, out, *extra)
    _assert_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure,fragment", [("nan", "loss became nan"),
                                              ("interrupt", "interrupted")])
def test_forget_failures_write_nothing(inputs, tmp_path, monkeypatch, failure, fragment):
    real = ProbeSet.loss

    def broken(self, pixel_weights=None):
        if failure == "interrupt":
            raise KeyboardInterrupt
        return real(self, pixel_weights) * float("nan")

    monkeypatch.setattr(ProbeSet, "loss", broken)
    out = tmp_path / "p.safetensors"
    result = _forget(inputs, out, "--no-real-image")
    if failure == "interrupt":  # 128 + SIGINT, and one line
        assert result.exit_code == 130 and "interrupted" in result.stderr, result.stderr
    else:
        _assert_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_forget_on_top_of_an_earlier_patch(inputs, tmp_path):
    first, second = tmp_path / "star.safetensors", tmp_path / "moon.safetensors"
    assert _forget(inputs, first, "--no-real-image").exit_code == 0
    result = runner.invoke(app, [
        "forget", "--model", str(inputs["sd1"]), "--concept", "moon", "--steps", "2",
        "--device", "cpu", "--no-real-image", "--set", f"on_top_of={first}", "--out", str(second)])
    assert result.exit_code == 0, result.output
    meta = load_patch(second).metadata
    assert meta["trained_on_top_of"] == [load_patch(first).name]
    assert "star" in meta["settings"]["also_avoid"]
    # Only LoRA patches can be trained on: a cross-attention delta is refused up front.
    delta = tmp_path / "delta.safetensors"
    assert _forget(inputs, delta, "--no-real-image", "--set", "train=xattn").exit_code == 0
    _assert_error(_forget(inputs, tmp_path / "x.safetensors", "--no-real-image",
                          "--set", f"on_top_of={delta}"), "--on-top-of needs LoRA patches")
    assert not (tmp_path / "x.safetensors").exists()


def test_forget_the_token_rows(inputs, tmp_path):
    out = tmp_path / "rows.safetensors"
    result = _forget(inputs, out, "--no-real-image", "--method", "token_rows")
    assert result.exit_code == 0, result.output
    assert "embedding, 2 tensors" in result.output
    patch = load_patch(out)
    assert patch.kind == "embedding" and patch.metadata["method"] == "token_rows"
    assert set(patch.tensors) == {"text_encoder.token_ids", "text_encoder.token_delta"}
    # generate applies it like any patch
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["generate", "--model", str(inputs["sd1"]), "--prompt", "a star",
                                 "--steps", "1", "--n", "1", "--device", "cpu",
                                 "--patch", str(out), "--out", str(grid)])
    assert result.exit_code == 0, result.output
    assert grid.is_file()
    # Token rows cannot be trained on top of LoRA patches, nor used as the earlier patch.
    lora = tmp_path / "lora.safetensors"
    assert _forget(inputs, lora, "--no-real-image").exit_code == 0
    _assert_error(_forget(inputs, tmp_path / "x.safetensors", "--no-real-image", "--method",
                          "token_rows", "--set", f"on_top_of={lora}"), "no LoRA part")
    _assert_error(_forget(inputs, tmp_path / "x.safetensors", "--no-real-image",
                          "--set", f"on_top_of={out}"), "--on-top-of needs LoRA")
    _assert_error(_forget(inputs, tmp_path / "x.safetensors", "--set", "train=rows"),
                  "unknown train 'rows'")
    assert not (tmp_path / "x.safetensors").exists()


def test_patch_on_another_family_is_refused(inputs, tmp_path):
    patch = tmp_path / "p.safetensors"
    assert _forget(inputs, patch, "--no-real-image").exit_code == 0
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["generate", "--model", str(inputs["sdxl"]), "--prompt", "a star",
                                 "--steps", "1", "--n", "1", "--device", "cpu",
                                 "--patch", str(patch), "--out", str(grid)])
    _assert_error(result, "made for a sd1 model but the pipeline is sdxl")
    assert not grid.exists()


def test_invert_then_forget_the_tokens(inputs, tmp_path):
    emb = tmp_path / "emb.safetensors"
    result = runner.invoke(app, ["invert", "--model", str(inputs["sd1"]), "--images",
                                 str(inputs["good"]), "--tokens", "2", "--init", "star",
                                 "--steps", "2", "--device", "cpu", "--out", str(emb)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "p.safetensors"
    result = _forget(inputs, out, "--no-real-image", "--concept", str(emb))
    assert result.exit_code == 0, result.output
    assert load_patch(out).metadata["concepts"][-1]["token_words"] == "<c0> <c1>"


@pytest.mark.parametrize("args,fragment", [
    (["--images", "{empty}"], "is empty"),
    (["--images", "{broken}"], "half.png"),
    (["--images", "{good}", "--tokens", "0"], "--tokens"),
    (["--images", "{good}", "--out", "{root}/e.pt"], ".safetensors"),
])
def test_invert_bad_input(inputs, tmp_path, args, fragment):
    extra = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in args]
    cmd = ["invert", "--model", str(inputs["sd1"]), "--steps", "1", "--device", "cpu",
           "--out", str(tmp_path / "e.safetensors"), *extra]
    _assert_error(runner.invoke(app, cmd), fragment)
    assert list(tmp_path.iterdir()) == []


def _library_stub(monkeypatch) -> dict:
    """`api.forget` replaced by a stub that records what the CLI passed; returns the record."""
    import forget_me_not.api as api
    from forget_me_not.patch import Patch

    seen: dict = {}

    def fake_forget(pipe, concepts, config=None, **kw):
        seen.update(kw, concepts=[c.name for c in concepts])
        rows = {"text_encoder.token_ids": torch.tensor([1]),
                "text_encoder.token_delta": torch.zeros(1, 32)}
        return Patch("embedding", rows, {"losses": [1.0], "seconds": 0.0, "method": "fake",
                                       "recipe": str(kw["recipe"])}, None, "fake")

    monkeypatch.setattr(api, "forget", fake_forget)
    monkeypatch.setattr(Patch, "save", lambda self, path: path)
    return seen


def test_cli_passes_method_recipe_and_sets_to_the_library(inputs, tmp_path, monkeypatch):
    seen = _library_stub(monkeypatch)
    result = _forget(inputs, tmp_path / "p.safetensors", "--no-real-image", "--recipe",
                     "paper-lora", "--method", "fmn", "--lr", "0.001", "--set", "lora_rank=8")
    assert result.exit_code == 0, result.output
    assert seen["method"] == "fmn" and seen["recipe"] == "paper-lora"
    assert seen["concepts"] == ["star"]
    assert {"lora_rank=8", "steps=2", "steps_per=run", "lr=0.001", "reference='noise'"} <= set(
        seen["sets"])


def test_a_set_seed_for_one_part_is_not_overridden_by_the_default_seed(inputs, tmp_path,
                                                                        monkeypatch):
    from forget_me_not import recipes

    seen = _library_stub(monkeypatch)
    result = _forget(inputs, tmp_path / "p.safetensors", "--no-real-image", "--recipe",
                     "paper-lora", "--set", "fmn.seed=3")
    assert result.exit_code == 0, result.output
    assert recipes.load("paper-lora").configs(False, list(seen["sets"]))[0].seed == 3


def test_forget_and_correct_keep_their_options_few():
    import typer.main

    from forget_me_not.cli.main import app as root

    group = typer.main.get_command(root)
    shared = {"allow_pickle", "config"}  # model loading, the same on every command
    for name in ("forget", "correct"):
        own = [p.name for p in group.commands[name].params if p.name not in shared]
        assert len(own) <= 15, (name, own)
