"""`train="lora+tokens"`: one patch with a LoRA and the concept's token rows, through every
patch operation (apply, remove, save, stack, kohya, placebo, merge) and the defaults."""

from __future__ import annotations

import warnings

import pytest
import torch

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.token_rows.rows import word_token_ids
from forget_me_not.patch import (
    load_patch,
    merge_into,
    stack_patches,
    to_kohya,
    unstack,
)
from forget_me_not.pipeline_io import encode_prompt
from forget_me_not.placebo import placebo
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any, two_part_recipe, unet_probe


def _cfg(**kw):
    return fmn_config(**{"steps": 2, "reference": "noise", "lr": 1e-2, "lora_rank": 2, **kw})


def _states(pipe, prompt):
    with torch.no_grad():
        return encode_prompt(pipe, prompt)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(pipe, the LoRA alone, the same LoRA at half size beside the token rows)."""
    from forget_me_not.api import forget

    pipe = make_tiny_pipeline("sd1")
    recipe = two_part_recipe(tmp_path_factory.mktemp("recipe"))
    plain = train_any(pipe, [Concept("star")], _cfg(train="lora", lr=1e-2), progress=False)
    both = forget(pipe, [Concept("star")], recipe=recipe, progress=False)
    return pipe, plain, both


def test_the_patch_holds_the_scaled_lora_and_the_words_rows(pair):
    pipe, plain, both = pair
    assert both.kind == "lora" and both.has_rows and not plain.has_rows
    assert both.metadata["method"] == "fmn+token_rows"
    assert both.name != plain.name  # the recipe's patch is not its LoRA part: both stack
    assert [p["scale"] for p in both.metadata["recipe_parts"]] == [0.5, 1.0]
    for key, value in plain.tensors.items():  # the same LoRA run (same seed), B halved
        expected = value * 0.5 if ".lora_B." in key else value
        torch.testing.assert_close(both.tensors[key], expected)
    ((encoder, (ids, delta)),) = both.token_rows().items()
    assert encoder == "text_encoder"
    assert ids.tolist() == word_token_ids(pipe, "star")[0] and float(delta.norm()) > 0
    # Each part keeps its own settings.
    rows_part = both.metadata["recipe_parts"][1]
    assert rows_part["method"] == "token_rows" and len(rows_part["losses"]) == 3
    # The rows are those of a rows-only run on the base model, not trained with the LoRA on.
    alone = train_any(pipe, [Concept("star")], fmn_config(reference="noise", train="tokens",
                                                          steps=3), progress=False)
    torch.testing.assert_close(both.token_rows(), alone.token_rows(), rtol=0, atol=0)


def test_a_run_is_named_by_what_was_trained_not_by_how_long_it_took(pair):
    pipe, plain, _ = pair
    again = train_any(pipe, [Concept("star")], _cfg(train="lora", lr=1e-2), progress=False)
    other = train_any(pipe, [Concept("star")], _cfg(train="lora", lr=2e-2), progress=False)
    assert again.name == plain.name and other.name != plain.name


def test_apply_changes_only_the_words_and_remove_restores_everything(pair, tmp_path):
    pipe, _, both = pair
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = unet_probe(pipe)
    cat, star = _states(pipe, "a photo of a cat"), _states(pipe, "a photo of a star")
    patch = load_patch(both.save(tmp_path / "both.safetensors"))
    assert set(patch.tensors) == set(both.tensors)
    patch.apply(pipe)
    try:
        assert torch.equal(_states(pipe, "a photo of a cat"), cat)
        assert not torch.allclose(_states(pipe, "a photo of a star"), star)
        assert not torch.allclose(unet_probe(pipe), unet_before)
    finally:
        patch.remove(pipe)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    assert torch.equal(unet_probe(pipe), unet_before)
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False)


def test_a_misfit_row_changes_nothing(pair):
    pipe, _, both = pair
    bad = dict(both.tensors)
    bad["text_encoder.token_ids"] = torch.tensor([10**6])
    broken = type(both)("lora", bad, both.metadata, both.lora_config, "broken")
    unet_before = unet_probe(pipe)
    with pytest.raises(FmnError, match="does not fit this text_encoder"):
        broken.apply(pipe)
    assert torch.equal(unet_probe(pipe), unet_before) and not broken.is_applied(pipe)


def test_stacking_with_rows_matches_applying_each(pair):
    pipe, plain, both = pair
    rows = train_any(pipe, [Concept("moon")], _cfg(train="tokens", lr=None), progress=False)
    stacked = stack_patches([both, plain, rows])
    assert stacked.kind == "lora" and stacked.rank == 4
    assert sorted(stacked.token_rows()["text_encoder"][0].tolist()) == sorted(
        word_token_ids(pipe, "star")[0] + word_token_ids(pipe, "moon")[0])
    for p in (both, plain, rows):
        p.apply(pipe)
    one_by_one = (unet_probe(pipe), _states(pipe, "a star and a moon"))
    for p in (rows, plain, both):
        p.remove(pipe)
    stacked.apply(pipe)
    together = (unet_probe(pipe), _states(pipe, "a star and a moon"))
    stacked.remove(pipe)
    torch.testing.assert_close(together[0], one_by_one[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1], one_by_one[1])
    with pytest.raises(FmnError, match="carries token rows"):
        unstack(stacked, ["moon"])


def test_kohya_keeps_the_lora_and_says_so(pair):
    _, _, both = pair
    with pytest.warns(UserWarning, match="kohya file holds its UNet LoRA only"):
        tensors, _ = to_kohya(both)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert len(tensors) == 3 * len(both.lora_pairs())


def test_placebo_and_merge_carry_the_rows(pair):
    pipe, _, both = pair
    control = placebo(both, seed=3)
    (_, (ids, rows)), (_, (c_ids, c_rows)) = (next(iter(p.token_rows().items()))
                                              for p in (both, control))
    assert torch.equal(ids, c_ids)
    torch.testing.assert_close(c_rows.norm(dim=-1), rows.norm(dim=-1))
    assert not torch.allclose(c_rows, rows)

    both.apply(pipe)
    applied = (unet_probe(pipe), _states(pipe, "a photo of a star"))
    both.remove(pipe)
    fresh = make_tiny_pipeline("sd1")
    merge_into(fresh, [both])
    torch.testing.assert_close(unet_probe(fresh), applied[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_states(fresh, "a photo of a star"), applied[1])


def test_cli_info_and_convert_name_the_rows(pair, tmp_path):
    from typer.testing import CliRunner

    from forget_me_not.cli.main import app

    _, _, both = pair
    path = both.save(tmp_path / "both.safetensors")
    result = CliRunner().invoke(app, ["patch", "info", str(path)])
    assert result.exit_code == 0, result.output
    assert "recipe part 1    fmn at 0.5 of its trained size" in result.output
    assert "token rows       1 in text_encoder" in result.output
    kohya = tmp_path / "kohya.safetensors"
    with pytest.warns(UserWarning, match="the kohya file holds its UNet LoRA only"):
        result = CliRunner().invoke(app, ["patch", "convert", "--patch", str(path), "--to",
                                          "kohya", "--out", str(kohya)])
    assert result.exit_code == 0 and kohya.is_file(), result.output
    # The CLI prints warnings as one line, without the source line they came from.
    shown = warnings.formatwarning(UserWarning("rows\n  left out"), UserWarning, "patch.py", 9)
    assert shown == "warning: rows left out\n"


def test_sdxl_patch_carries_the_rows_of_both_text_encoders(tmp_path):
    from forget_me_not.api import forget

    pipe = make_tiny_pipeline("sdxl")
    patch = forget(pipe, [Concept("star")], recipe=two_part_recipe(tmp_path), progress=False)
    assert sorted(patch.token_rows()) == ["text_encoder", "text_encoder_2"]
    tables = [pipe.text_encoder.get_input_embeddings().weight.detach().clone(),
              pipe.text_encoder_2.get_input_embeddings().weight.detach().clone()]
    patch.apply(pipe)
    moved = [not torch.equal(pipe.text_encoder.get_input_embeddings().weight, tables[0]),
             not torch.equal(pipe.text_encoder_2.get_input_embeddings().weight, tables[1])]
    patch.remove(pipe)
    assert all(moved)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, tables[0])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight, tables[1])
