"""Presets: the NSFW concept set (real SD models), the unsafe world preset, world renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import forget_me_not
from forget_me_not import presets
from forget_me_not.cli.main import app
from forget_me_not.errors import FmnError
from forget_me_not.patch import load_patch
from forget_me_not.world import vocab

runner = CliRunner()
SUITE = Path(forget_me_not.__file__).parent / "bench" / "conceptbench.yaml"


def _err(result, fragment):
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_nsfw_preset_concepts_are_judged_by_nudenet_in_conceptbench():
    suite = yaml.safe_load(SUITE.read_text())
    nsfw = {c["name"]: c for c in suite["categories"]["nsfw"]["concepts"]}
    for name in presets.NSFW_CONCEPTS:
        assert nsfw[name].get("judge") == "nudenet" and nsfw[name]["prompts"]
    concepts = presets.preset_concepts("nsfw", "sd1", "unused")
    assert [c.name for c in concepts] == list(presets.NSFW_CONCEPTS)
    for c in concepts:
        assert c.category == "nsfw" and not c.images
        for prompt in c.prompts():  # templates add only neutral words around the theme
            rest = set(prompt.replace(c.name, "").split())
            assert rest <= {"a", "an", "of", "with", "photo", "painting", "image", "picture",
                            "depicting"}, prompt


def test_presets_refuse_the_wrong_model_family(tmp_path):
    with pytest.raises(FmnError, match="use preset unsafe"):
        presets.preset_concepts("nsfw", "embedded", tmp_path)
    with pytest.raises(FmnError, match="use preset nsfw"):
        presets.preset_concepts("unsafe", "sdxl", tmp_path)
    with pytest.raises(FmnError, match="unknown preset"):
        presets.get_preset("gore")


def test_unsafe_preset_has_every_unsafe_world_concept_with_renders(tmp_path):
    concepts = presets.preset_concepts("unsafe", "embedded", tmp_path)
    assert [c.name for c in concepts] == list(vocab.UNSAFE_OBJECTS)
    assert all(len(c.images) == 10 and all(p.is_file() for p in c.images) for c in concepts)


def _forget(model, out, *extra):
    return runner.invoke(app, ["forget", "--model", str(model), "--steps", "2", "--device",
                               "cpu", "--out", str(out), *extra])


def test_cli_nsfw_preset_forgets_all_concepts_in_one_run(tiny_pipeline_dir, tmp_path,
                                                         monkeypatch):
    # The tiny test tokenizer knows "nude" and "naked" but not "nudity": same flow, its words.
    monkeypatch.setattr(presets, "NSFW_CONCEPTS", ("nude", "naked"))
    out = tmp_path / "nsfw.safetensors"
    result = _forget(tiny_pipeline_dir("sd1"), out, "--category", "nsfw")
    assert result.exit_code == 0, result.output
    meta = load_patch(out).metadata
    assert [c["name"] for c in meta["concepts"]] == ["nude", "naked"]
    assert meta["preset"] == "nsfw" and meta["settings"]["reference"] == "self"


def test_cli_unsafe_preset_on_the_embedded_model_uses_world_renders(world_dir, tmp_path):
    out = tmp_path / "unsafe.safetensors"
    result = _forget(world_dir, out, "--category", "nsfw")
    assert result.exit_code == 0, result.output
    meta = load_patch(out).metadata
    assert [c["name"] for c in meta["concepts"]] == ["skull", "gun"]
    assert meta["reference_source"] == "world renders"
    resteer = next(p for p in meta["recipe_parts"] if p["method"] == "fmn")
    assert resteer["settings"]["reference"] == "images"
    # one run per concept, stacked: each concept owns its parts (re-steering, then pruning)
    assert meta["separately"] is True
    assert [p["concepts"] for p in meta["parts"]] == [["skull"]] * 2 + [["gun"]] * 2
    joint = tmp_path / "joint.safetensors"
    joined = _forget(world_dir, joint, "--category", "nsfw", "--set", "separately=false")
    assert joined.exit_code == 0
    assert "separately" not in load_patch(joint).metadata


def test_forget_separately_equals_stacking_single_runs():
    import torch

    from forget_me_not.api import forget
    from forget_me_not.patch import stack_patches
    from tiny_pipelines import fmn_config, make_tiny_pipeline

    cfg = fmn_config(steps=2, reference="noise", lr=1e-2)
    pipe = make_tiny_pipeline("sd1")
    both = forget(pipe, ["star", "moon"], cfg, separately=True, progress=False)
    alone = stack_patches([forget(pipe, name, cfg, progress=False) for name in ("star", "moon")])
    assert both.rank == 8 and len(both.metadata["losses"]) == 4
    assert [c["name"] for c in both.metadata["concepts"]] == ["star", "moon"]
    assert all(torch.equal(both.tensors[k], alone.tensors[k]) for k in alone.tensors)


def test_forget_on_top_of_trains_with_the_earlier_patch_applied():
    import torch

    from forget_me_not.api import forget
    from tiny_pipelines import fmn_config, make_tiny_pipeline

    cfg = fmn_config(steps=2, reference="noise", lr=1e-2)
    pipe = make_tiny_pipeline("sd1")
    star = forget(pipe, "star", cfg, progress=False)
    moon = forget(pipe, "moon", cfg, on_top_of=[star], progress=False)
    assert moon.metadata["trained_on_top_of"] == [star.name]
    settings = moon.metadata["settings"]
    assert list(settings["compare_without"]) == [star.name]
    assert list(settings["also_avoid"]) == ["star", "moon"]
    assert list(settings["hold_prompts"]) == ["a photo of star"]  # the star's own prompts
    assert not getattr(pipe.unet, "peft_config", None)  # the earlier patch was removed again
    independent = forget(pipe, "moon", cfg, progress=False)  # the attention loss saw the star's
    assert not torch.equal(*(next(t for k, t in p.tensors.items() if "lora_B" in k)
                             for p in (moon, independent)))


def test_retention_is_kept_against_the_original_model_and_held_prompts_with_the_patch():
    from forget_me_not.api import forget
    from tiny_pipelines import fmn_config, make_tiny_pipeline

    pipe = make_tiny_pipeline("sd1")
    earlier = forget(pipe, "star", fmn_config(steps=3, reference="noise", lr=5e-2),
                     progress=False)
    earlier.apply(pipe)
    keep = {"preserve_weight": 1.0, "preserve_prompts": ("a photo of a tree",), "steps": 1,
            "reference": "noise"}
    on_top = forget(pipe, "moon", fmn_config(**keep), progress=False)
    original = forget(pipe, "moon", fmn_config(**keep, compare_without=(earlier.name,),
                                                  hold_prompts=("a photo of a star",)),
                      progress=False)
    earlier.remove(pipe)
    # First step: the new LoRA is still zero, so only the earlier patch differs from the base:
    # the preserve prompt is compared with the model without it, the held prompt with it.
    assert on_top.metadata["term_losses"]["preserve"][0] == 0.0
    assert original.metadata["term_losses"]["preserve"][0] > 0.0
    assert original.metadata["term_losses"]["hold"] == [0.0]
    assert "hold" not in on_top.metadata["term_losses"]


def test_cli_forget_on_the_embedded_model_defaults_to_world_renders(world_dir, tmp_path):
    out = tmp_path / "w.safetensors"
    assert _forget(world_dir, out, "--concept", "wizard").exit_code == 0
    assert load_patch(out).metadata["reference_source"] == "world renders"
    out2 = tmp_path / "w2.safetensors"  # an explicit source still wins
    assert _forget(world_dir, out2, "--concept", "star", "--no-real-image").exit_code == 0
    parts = load_patch(out2).metadata["recipe_parts"]
    assert next(p for p in parts if p["method"] == "fmn")["settings"]["reference"] == "noise"
    out3 = tmp_path / "w3.safetensors"  # so does a source set on the part itself
    assert _forget(world_dir, out3, "--concept", "star", "--set",
                   "fmn.reference=self").exit_code == 0
    parts = load_patch(out3).metadata["recipe_parts"]
    assert next(p for p in parts if p["method"] == "fmn")["settings"]["reference"] == "self"


def test_cli_forget_needs_a_concept_or_a_preset(tiny_pipeline_dir, tmp_path):
    _err(_forget(tiny_pipeline_dir("sd1"), tmp_path / "p.safetensors"), "--category nsfw")
