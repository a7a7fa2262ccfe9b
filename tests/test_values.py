"""Value-space erasure on tiny SD 1.x, 2.x and SDXL pipelines: the whitened projection, what the
patch changes, the rounds against learnt tokens, and bad settings refused before work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forget_me_not.api import forget
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.values.config import ValuesConfig
from forget_me_not.methods.values.projection import LayerSpace
from forget_me_not.methods.values.train import kept_prompts, tail_rows
from forget_me_not.methods.values.train import train as values
from forget_me_not.patch import load_patch
from tiny_pipelines import make_tiny_pipeline


def _space(seed: int = 0, width: int = 12, out: int = 8) -> tuple[LayerSpace, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=gen)
    kept = torch.randn(200, width, generator=gen)
    return LayerSpace(weight, kept, ridge=0.01), kept


def test_removed_directions_are_out_of_reach_of_every_input():
    space, _ = _space()
    concept = torch.randn(30, 12, generator=torch.Generator().manual_seed(1)) * 3
    space.remove(concept, 2)
    f = space.factors()
    edited = space.weight + f["B"].double() @ f["A"].double()
    anything = torch.randn(500, 12, generator=torch.Generator().manual_seed(2)).double()
    reach = (anything @ edited.T) @ space.whiten.T @ space.removed  # whitened, along E
    assert float(reach.abs().max()) < 1e-6
    assert space.removed.shape[1] == 2 and len(space.ratios) == 2


def test_the_direction_taken_is_the_concepts_and_costs_the_kept_least():
    space, kept = _space()
    gen = torch.Generator().manual_seed(3)
    concept = torch.randn(40, 12, generator=gen) * 0.1 + 3 * torch.randn(12, generator=gen)
    assert space.remove(concept, 1)[0] > 10  # far more of the concept lies there than kept
    f = space.factors()
    moved = concept.double() @ (f["B"].double() @ f["A"].double()).T
    assert float(moved.norm() / (concept.double() @ space.weight.T).norm()) > 0.8
    # the orthogonal projection with the same null space moves the kept outputs more
    y = kept.double() @ space.weight.T
    q, _ = torch.linalg.qr(space.chol @ space.removed)
    orthogonal = float(((y @ q) @ q.T).norm() ** 2 / y.norm() ** 2)
    assert space.kept_cost(kept) <= orthogonal + 1e-9


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_values_edits_only_the_values_and_the_concept_loses_its_direction(family):
    pipe = make_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    config = ValuesConfig(rounds=0, preserve=("a photo of a cat", "a dog"))
    patch = values(pipe, [Concept("star")], config, progress=False)
    assert {n: p for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])} == {}
    assert patch.kind == "lora" and patch.metadata["method"] == "values"
    assert patch.tensors and all(".attn2.to_v." in k for k in patch.tensors)
    assert patch.metadata["removed_directions"] == 1
    own = tail_rows(pipe, Concept("star").prompts(), "star").float()
    layers = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_v")}
    kept = tail_rows(pipe, ["a photo of a cat"], "cat").float()
    base_own = {n: m(own).detach() for n, m in layers.items()}
    base_kept = {n: m(kept).detach() for n, m in layers.items()}
    patch.apply(pipe)
    edited = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_v")}
    for n, m in edited.items():
        with torch.no_grad():
            own_moved = float((m(own) - base_own[n]).norm() / base_own[n].norm())
            kept_moved = float((m(kept) - base_kept[n]).norm() / base_kept[n].norm())
        assert own_moved > kept_moved  # the concept's outputs move more than a kept prompt's
    patch.remove(pipe)


def _references(folder, n: int = 2) -> tuple:
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return tuple(paths)


def test_a_round_removes_another_direction_and_leaves_the_pipeline_as_it_was(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    concept = Concept("star", images=_references(tmp_path))
    config = ValuesConfig(rounds=2, round_steps=2, preserve=("a dog",))
    patch = values(pipe, [concept], config, progress=False)
    assert patch.metadata["removed_directions"] == 3 and len(patch.metadata["stage_energies"]) == 3
    assert len(pipe.tokenizer) == vocab  # the rounds' tokens are gone again
    again = values(pipe, [concept], config, progress=False)  # deterministic with the seed
    assert all(torch.equal(patch.tensors[k], again.tensors[k]) for k in patch.tensors)


def test_values_through_forget_saves_and_loads(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    concept = Concept("star", images=_references(tmp_path))
    patch = forget(pipe, concept, method="values", sets=["rounds=1", "round_steps=2"],
                   progress=False)
    assert patch.metadata["recipe"] == "values"
    loaded = load_patch(patch.save(tmp_path / "p.safetensors"))
    assert loaded.metadata["method"] == "values" and loaded.tensors.keys() == patch.tensors.keys()


def test_kept_prompts_hold_the_empty_prompt_and_never_a_targets_word():
    config = ValuesConfig(preserve=("a star and a cat", "a cat"), preserve_set="conceptworld")
    kept = kept_prompts(config, [Concept("star")])
    assert kept[0] == "" and "a cat" in kept and len(kept) > 20
    assert not any("star" in p.split() for p in kept)


@pytest.mark.parametrize("sets,message", [(["rounds=-1"], "rounds must be"),
                                          (["directions=0"], "directions must be"),
                                          (["targets=[to_q]"], "targets must be"),
                                          (["ridge=0"], "ridge")])
def test_values_refuses_bad_settings_before_work(sets, message, tmp_path):
    pipe = make_tiny_pipeline("sd1")
    concept = Concept("star", images=_references(tmp_path))
    with pytest.raises(FmnError, match=message):
        forget(pipe, concept, method="values", sets=sets, progress=False)


def test_rounds_without_reference_images_are_refused_before_work():
    pipe = make_tiny_pipeline("sd1")
    with pytest.raises(FmnError, match="reference images"):
        values(pipe, [Concept("star")], ValuesConfig(rounds=1), progress=False)


def test_against_the_worst_prompt_no_kept_prompt_pays_more_than_on_average():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 12, generator=gen)
    kept = torch.randn(40, 5, 12, generator=gen)  # 40 kept prompts of 5 positions
    concept = torch.randn(30, 12, generator=gen) + 2 * torch.randn(12, generator=gen)
    kept[0] += 4 * concept.mean(0)  # one kept prompt leans where the concept does
    rows = kept.flatten(0, 1)

    def worst(space):
        f = space.factors()
        moved = (rows.double() @ (f["B"].double() @ f["A"].double()).T).reshape(40, 5, -1)
        own = (rows.double() @ space.weight.T).reshape(40, 5, -1)
        return float((moved.pow(2).sum((1, 2)) / own.pow(2).sum((1, 2))).max())

    average = LayerSpace(weight, rows, 0.01)
    average.remove(concept, 1)
    guarded = LayerSpace(weight, rows, 0.01, prompt_length=5)
    guarded.remove(concept, 1, worst=True)
    assert worst(guarded) < worst(average)
    assert guarded.ratios[0] > 1  # it still takes a direction the concept uses more than kept


def test_world_contexts_for_a_concept_outside_the_world_are_refused_before_work():
    pipe = make_tiny_pipeline("sd1")
    with pytest.raises(FmnError, match="not a ConceptWorld concept"):
        values(pipe, [Concept("lighthouse")], ValuesConfig(contexts="conceptworld"),
               progress=False)
