"""Correction by the role's token embedding: the trainer, the "embedding" patch kind, the CLI."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from forget_me_not.cli.main import app
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.correction.pull import TokenPullConfig, pull_tokens
from forget_me_not.methods.token_rows.rows import word_token_ids
from forget_me_not.patch import (
    Patch,
    describe,
    extract_lora,
    load_patch,
    merge_into,
    save_merged,
    stack_patches,
    to_kohya,
)
from forget_me_not.pipeline_io import encode_prompt
from tiny_pipelines import make_tiny_pipeline

runner = CliRunner()
ROLE = Concept("wizard", "id", ("a photo of a {}",))
ANCHORS = ("a photo of a moon",)


def _pull(family="sd1", role=ROLE, steps=20, seed=0, anchors=ANCHORS):
    pipe = make_tiny_pipeline(family)
    cfg = TokenPullConfig(steps=steps, lr=1e-2, seed=seed, anchor_steps=2)
    return pipe, pull_tokens(pipe, role, anchors, cfg, progress=False)


@pytest.fixture(scope="module")
def pulled():
    return _pull()


def _states(pipe, prompt):
    with torch.no_grad():
        return encode_prompt(pipe, prompt)[0]


def _gap(pipe, prompt, anchor):
    """Squared gap of the UNet on `prompt` to the (unpatched) UNet on `anchor`, fixed inputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([200, 700])
    with torch.no_grad():
        a = pipe.unet(x, t, encoder_hidden_states=_states(pipe, anchor).expand(2, -1, -1)).sample
        p = pipe.unet(x, t, encoder_hidden_states=_states(pipe, prompt).expand(2, -1, -1)).sample
    return float((a - p).pow(2).mean())


def test_pull_trains_only_the_role_rows_and_leaves_other_prompts_identical(pulled):
    pipe, patch = pulled
    assert patch.kind == "embedding"
    ids, delta = patch.token_rows()["text_encoder"]
    assert ids.tolist() == word_token_ids(pipe, "wizard")[0] and delta.shape == (1, 32)
    assert float(delta.abs().sum()) > 0
    assert len(patch.metadata["losses"]) == 20 and patch.metadata["tokens"] == [["wizard</w>"]]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    other, role = _states(pipe, "a photo of a moon"), _states(pipe, "a photo of a wizard")
    gap_before = _gap(pipe, "a photo of a wizard", "a photo of a moon")
    patch.apply(pipe)
    assert torch.equal(_states(pipe, "a photo of a moon"), other)  # no role token: bit-identical
    assert not torch.allclose(_states(pipe, "a photo of a wizard"), role)
    assert _gap(pipe, "a photo of a wizard", "a photo of a moon") < gap_before  # pulled toward
    patch.remove(pipe)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_pull_is_deterministic_and_the_patch_round_trips(pulled, tmp_path):
    _, patch = pulled
    _, again = _pull()
    assert all(torch.equal(patch.tensors[k], again.tensors[k]) for k in patch.tensors)
    _, other_seed = _pull(seed=1)
    assert not torch.equal(patch.tensors["text_encoder.token_delta"],
                           other_seed.tensors["text_encoder.token_delta"])
    loaded = load_patch(patch.save(tmp_path / "fix.safetensors"))
    assert loaded.kind == "embedding" and loaded.name == patch.name
    assert all(torch.equal(patch.tensors[k], loaded.tensors[k]) for k in patch.tensors)
    info = describe(loaded, tmp_path / "fix.safetensors")
    assert info["modules"] == 1 and info["tokens"] == [["wizard</w>"]]


def test_sdxl_pull_trains_a_row_in_each_text_encoder():
    pipe, patch = _pull("sdxl", steps=2)
    rows = patch.token_rows()
    assert sorted(rows) == ["text_encoder", "text_encoder_2"]
    assert all(float(d.abs().sum()) > 0 for _, d in rows.values())
    tables = [e.get_input_embeddings().weight.detach().clone()
              for e in (pipe.text_encoder, pipe.text_encoder_2)]
    patch.apply(pipe)
    patch.remove(pipe)
    for enc, table in zip((pipe.text_encoder, pipe.text_encoder_2), tables, strict=True):
        assert torch.equal(enc.get_input_embeddings().weight, table)


def test_pull_bad_input():
    pipe = make_tiny_pipeline("sd1")
    with pytest.raises(FmnError, match="--toward PROMPT"):
        pull_tokens(pipe, ROLE, (), progress=False)
    with pytest.raises(FmnError, match="contains the role"):
        pull_tokens(pipe, ROLE, ("a wizard on a hill",), progress=False)
    with pytest.raises(FmnError, match="steps"):
        TokenPullConfig(steps=0)
    with pytest.raises(FmnError, match="learning rate"):
        TokenPullConfig(lr=0.0)


def test_strength_stacking_and_merging_of_embedding_patches(pulled, tmp_path):
    pipe, patch = pulled
    _, second = _pull(role=Concept("moon", "object", ("a {}",)), anchors=("a photo of a cat",))
    table = pipe.text_encoder.get_input_embeddings().weight
    base = table.detach().clone()
    # strength: half the rows' change
    patch.apply(pipe, scale=0.5)
    half = table.detach().clone()
    patch.remove(pipe)
    weaker = patch.scaled(0.5)
    weaker.apply(pipe)
    assert torch.allclose(table, half, atol=1e-7)
    weaker.remove(pipe)
    assert torch.equal(table, base)
    # stacking two embedding patches = applying both; removal in any order is exact
    patch.apply(pipe)
    second.apply(pipe)
    both = table.detach().clone()
    patch.remove(pipe)
    second.remove(pipe)
    assert torch.equal(table, base)
    stacked = stack_patches([patch, second])
    assert stacked.kind == "embedding" and len(stacked.metadata["parts"]) == 2
    stacked.apply(pipe)
    assert torch.allclose(table, both, atol=1e-7)
    stacked.remove(pipe)
    # merging writes a pipeline whose token rows carry the change
    merged = make_tiny_pipeline("sd1")
    merge_into(merged, [patch])
    patch.apply(pipe)
    assert torch.allclose(merged.text_encoder.get_input_embeddings().weight, table)
    patch.remove(pipe)
    out = save_merged(merged, [patch], tmp_path / "merged")
    reloaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert torch.allclose(reloaded.text_encoder.get_input_embeddings().weight,
                          merged.text_encoder.get_input_embeddings().weight)


def test_embedding_patches_refuse_what_they_cannot_be(pulled, tmp_path):
    from tiny_pipelines import fmn_config, train_any

    pipe, patch = pulled
    lora = train_any(make_tiny_pipeline("sd1"), [Concept("star")],
                   fmn_config(steps=1, reference="noise"), progress=False)
    mixed = stack_patches([patch, lora])  # one file: the LoRA carrying the role's rows
    assert mixed.kind == "lora" and mixed.has_rows
    assert torch.equal(mixed.token_rows()["text_encoder"][0], patch.token_rows()["text_encoder"][0])
    with pytest.raises(FmnError, match="kohya LoRA format cannot carry"):
        to_kohya(patch)
    with pytest.raises(FmnError, match="no LoRA form"):
        extract_lora(patch, 2)
    with pytest.raises(FmnError, match="no UNet delta form"):
        patch.to_delta()
    # damaged: ids and rows disagree, or a row for a token the model does not have
    bad = dict(patch.tensors)
    bad["text_encoder.token_ids"] = torch.tensor([1, 2])
    with pytest.raises(FmnError, match="damaged"):
        Patch("embedding", bad, patch.metadata)
    far = {**patch.tensors, "text_encoder.token_ids": torch.tensor([10_000_000])}
    with pytest.raises(FmnError, match="does not fit"):
        Patch("embedding", far, {}, None, "far").apply(pipe)
    sdxl = make_tiny_pipeline("sdxl")
    with pytest.raises(FmnError, match="made for a sd1 model"):
        patch.apply(sdxl)


def test_cli_correct_defaults_to_the_embedding_method_on_the_world(world_dir, tmp_path):
    out = tmp_path / "fix.safetensors"
    result = runner.invoke(app, ["correct", "--model", str(world_dir), "--concept", "wizard",
                                 "--away-from", "milka", "--steps", "2", "--set", "n_check=0",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    patch = load_patch(out)
    assert patch.kind == "embedding" and len(patch.metadata["losses"]) == 2
    anchors = patch.metadata["correction"]["anchor_prompts"]
    assert "zorbo wearing a hat" in anchors and not any("milka" in a for a in anchors)
    assert patch.metadata["correction"]["method"] == "embedding"
    info = runner.invoke(app, ["patch", "info", str(out)])
    assert info.exit_code == 0 and "wizard" in info.output, info.output
    kohya = runner.invoke(app, ["patch", "convert", "--patch", str(out), "--to", "kohya",
                                "--out", str(tmp_path / "k.safetensors")])
    assert kohya.exit_code == 2 and "fmn patch merge" in kohya.stderr
    assert not (tmp_path / "k.safetensors").exists()
