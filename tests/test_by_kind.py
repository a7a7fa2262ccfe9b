"""Recipes whose parts are for one kind of concept (`only: anchored` / `only: plain`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forget_me_not import recipes
from forget_me_not.api import forget
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from tiny_pipelines import make_tiny_pipeline

FMN = ("{train: lora, lora_rank: 2, steps: 3, lr: 1.0e-2, reference: noise, "
       "concept_anchor_weight: 1.0}")
UCE = "{preserve_set: ''}"


def _write(tmp_path, name, parts):
    path = tmp_path / f"{name}.yaml"
    path.write_text("description: test\nparts:\n" + "".join(f"  - {p}\n" for p in parts))
    return path


def _same(a, b):
    return a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_each_concept_is_trained_by_the_part_for_its_kind_and_by_it_alone(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    routed = _write(tmp_path, "routed", [f"{{method: uce, only: anchored, config: {UCE}}}",
                                         f"{{method: fmn, only: plain, config: {FMN}}}"])
    fmn_alone = _write(tmp_path, "fmn_alone", [f"{{method: fmn, config: {FMN}}}"])
    uce_alone = _write(tmp_path, "uce_alone", [f"{{method: uce, config: {UCE}}}"])
    star, dotted = Concept("star"), Concept("dotted", anchor="solid")
    # An object goes to the FMN part only: the patch is that part's own run, bit for bit.
    plain = forget(pipe, star, recipe=routed, progress=False)
    assert plain.metadata["method"] == "fmn"
    assert _same(plain, forget(pipe, star, recipe=fmn_alone, progress=False))
    # A concept naming an anchor goes to the UCE part only.
    styled = forget(pipe, dotted, recipe=routed, progress=False)
    assert styled.metadata["method"] == "uce"
    assert _same(styled, forget(pipe, dotted, recipe=uce_alone, progress=False))
    # Both at once: each part trains its own concept, and the patch forgets both.
    both = forget(pipe, [star, dotted], recipe=routed, progress=False)
    assert both.metadata["method"] == "uce+fmn"
    assert {c["name"] for c in both.metadata["concepts"]} == {"star", "dotted"}


def test_a_concept_no_part_takes_is_refused_before_training(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    styles_only = _write(tmp_path, "styles", [f"{{method: uce, only: anchored, config: {UCE}}}"])
    with pytest.raises(FmnError, match="has no part for 'star'.*without an anchor"):
        forget(pipe, Concept("star"), recipe=styles_only, progress=False)


@pytest.mark.parametrize(("text", "match"), [
    ("parts: [{method: uce, only: styles}]", "only must be 'anchored'"),
    ("sequential: true\nparts: [{method: uce, only: anchored}, "
     "{method: fmn, config: {train: lora}}]", "drop 'only' or 'sequential'"),
])
def test_bad_only_is_named(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FmnError, match=match):
        recipes.load(path)


@pytest.mark.parametrize(("name", "fmn_part", "changed", "prune_changed"), [
    ("conceptworld-by-kind", "conceptworld-robust-stop", {}, {}),
    ("conceptworld-robust-prune", "conceptworld-robust", {"ship_levels": "coarse", "restarts": 3},
     {"score": "both"}),
])
def test_a_shipped_by_kind_recipe_is_the_three_recipes_it_names(name, fmn_part, changed,
                                                                 prune_changed):
    by_kind = recipes.load(name)
    style, fmn, prune = by_kind.parts
    assert (style.only, fmn.only, prune.only) == ("anchored", "plain", "plain")
    # Each part's settings are its recipe's, whatever the rest of the request holds.
    for flag in (False, True):
        got = by_kind.configs(flag)
        assert got[0] == recipes.load("conceptworld-rece").configs(True)[0]
        # the re-steering part as its recipe sets it, but for the fields its config changes
        assert got[1] == dataclasses.replace(recipes.load(fmn_part).configs(False)[0], **changed)
        assert got[2] == dataclasses.replace(recipes.load("conceptworld-prune").configs(False)[0],
                                             **prune_changed)
