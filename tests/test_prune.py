"""Skilled-neuron pruning on tiny SD 1.x, 2.x and SDXL pipelines: which units it picks, what the
patch changes, and bad settings refused before work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forget_me_not.api import forget
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.prune.config import PruneConfig
from forget_me_not.methods.prune.neurons import effect, find_sites, select_units, unit_ratios
from forget_me_not.methods.prune.train import kept_groups
from forget_me_not.methods.prune.train import train as prune
from forget_me_not.patch import load_patch
from tiny_pipelines import make_tiny_pipeline

# kept: two prompts of your own (a random model's samples of many prompts drive every unit)
QUICK = PruneConfig(kept_set="", preserve=("a photo of a cat", "a dog"), sample_steps=2,
                    timesteps=(0.3, 0.7), fraction=0.05, min_ratio=1.01,
                    sites=("ff", "resnet"))


def _images(folder, n: int = 4, size: int = 16) -> tuple:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        # sharp red and white stripes with grain: unlike anything the kept prompts draw
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[:, ::2] = (255, 255, 255)
        pixels[:, 1::2] = (255, 0, 0)
        pixels = np.clip(pixels.astype(int) - rng.integers(0, 30, pixels.shape), 0, 255)
        path = folder / f"stripes_{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return tuple(paths)


def skilled_units(own, kept, count, min_ratio=1.0):
    return select_units(unit_ratios(own, kept), count, min_ratio)


def test_a_unit_is_chosen_only_where_the_concept_drives_it_above_every_kept_group():
    own = {"a": torch.tensor([5.0, 5.0, 1.0, 0.5]), "b": torch.tensor([3.0])}
    kept = [{"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([1.0])},
            {"a": torch.tensor([1.0, 6.0, 0.5, 1.0]), "b": torch.tensor([2.0])}]
    units, ratios = skilled_units(own, kept, count=3)
    # a0: 5x the most any kept group gives it; a1: a kept group drives it harder; a2: only 1x
    assert units == {"a": [0], "b": [0]} and ratios == [5.0, 1.5]
    assert skilled_units(own, kept, count=1)[0] == {"a": [0]}
    assert skilled_units(own, kept, count=3, min_ratio=2.0)[0] == {"a": [0]}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_prune_zeroes_the_chosen_units_and_nothing_else(family, tmp_path):
    pipe = make_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    concept = Concept("star", images=_images(tmp_path / "star"))
    patch = prune(pipe, [concept], QUICK, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert patch.kind == "delta" and patch.metadata["method"] == "prune"
    assert patch.metadata["concept_source"] == ["images"]
    chosen = patch.metadata["pruned_units"]
    sites = {s.name: s.units for s in find_sites(pipe.unet, ("ff", "resnet"))}
    assert set(chosen) <= set(sites) and patch.metadata["units_pruned"] >= 1
    assert patch.metadata["units_pruned"] <= round(QUICK.fraction * sum(sites.values()))
    patch.apply(pipe)
    params = dict(pipe.unet.named_parameters())
    for name, p in params.items():
        site = name.removesuffix(".weight")
        if site in chosen:
            idx = chosen[site]
            assert float(p.detach()[:, idx].abs().max()) == 0.0  # their outputs are gone
            rest = [i for i in range(p.shape[1]) if i not in idx]
            assert torch.equal(p[:, rest], before[name][:, rest])
        else:
            assert torch.equal(p, before[name])
    patch.remove(pipe)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_feed_forward_sites_alone_leave_every_resnet_channel(tmp_path):
    import dataclasses

    pipe = make_tiny_pipeline("sd1")
    concept = Concept("star", images=_images(tmp_path / "star"))
    patch = prune(pipe, [concept], dataclasses.replace(QUICK, sites=("ff",)), progress=False)
    chosen = patch.metadata["pruned_units"]
    assert chosen and all(name.endswith(".ff.net.2") for name in chosen)
    assert not any(".resnets." in key for key in patch.tensors)


def test_a_units_effect_is_what_switching_it_off_moves_not_how_hard_it_fires():
    pipe = make_tiny_pipeline("sd1")
    site = next(s for s in find_sites(pipe.unet, ("ff",)))
    with torch.no_grad():
        site.module.weight[:, 0] = 0.0  # unit 0 fires as before but reaches nothing
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in pipe.unet.parameters()]

    def read(probes: int) -> torch.Tensor:
        return effect(pipe, [site], latents, ["a cat"], (0.5,),
                      torch.Generator().manual_seed(1), probes=probes)[site.name]

    scores = read(8)
    assert float(scores[0]) == 0.0 and float(scores[1:].min()) > 0.0
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert all(p.grad is None for p in pipe.unet.parameters())
    # switching off the unit it scores highest moves the prediction more than the lowest
    order = scores[1:].argsort() + 1
    high, low = int(order[-1]), int(order[0])
    gen = torch.Generator().manual_seed(2)
    t = torch.full((3,), 500)
    noisy = pipe.scheduler.add_noise(latents, torch.randn(latents.shape, generator=gen), t)
    states = pipe.encode_prompt(["a cat"] * 3, "cpu", 1, False)[0]

    def moved(unit: int) -> float:
        with torch.no_grad():
            base = pipe.unet(noisy, t, encoder_hidden_states=states).sample
            kept = site.module.weight[:, unit].clone()
            site.module.weight[:, unit] = 0.0
            off = pipe.unet(noisy, t, encoder_hidden_states=states).sample
            site.module.weight[:, unit] = kept
        return float((off - base).norm())

    assert moved(high) > moved(low)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prune_by_effect_reads_gate_gradients_and_zeroes_what_it_chose(family, tmp_path):
    import dataclasses

    pipe = make_tiny_pipeline(family)
    concept = Concept("star", images=_images(tmp_path / "star"))
    patch = prune(pipe, [concept], dataclasses.replace(QUICK, score="effect"), progress=False)
    assert patch.metadata["train"] == "gate gradient statistics"
    assert patch.metadata["units_pruned"] >= 1
    assert len(patch.tensors) == len(patch.metadata["pruned_units"])


def test_prune_by_both_takes_a_unit_only_when_each_reading_would(tmp_path):
    import dataclasses

    pipe = make_tiny_pipeline("sd1")
    concept = Concept("star", images=_images(tmp_path / "star"))
    # room for every unit above the floor: no reading is cut short by the count
    wide = dataclasses.replace(QUICK, fraction=0.45, min_ratio=1.5)
    chosen = {}
    for score in ("activity", "effect", "both"):
        patch = prune(pipe, [concept], dataclasses.replace(wide, score=score), progress=False)
        sites = sum(s.units for s in find_sites(pipe.unet, wide.sites))
        assert patch.metadata["units_pruned"] < round(wide.fraction * sites)
        chosen[score] = {(n, i) for n, v in patch.metadata["pruned_units"].items() for i in v}
    assert chosen["both"] == chosen["activity"] & chosen["effect"]
    assert chosen["both"] and chosen["activity"] != chosen["effect"]


def test_prune_through_forget_saves_and_loads(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    concept = Concept("star", images=_images(tmp_path / "star"))
    sets = ["kept_set=", "preserve=[a photo of a cat]", "sample_steps=2", "timesteps=[0.5]",
            "min_ratio=1.01"]
    patch = forget(pipe, [concept], recipe="prune", sets=sets, progress=False)
    again = forget(pipe, [concept], recipe="prune", sets=sets, progress=False)
    assert patch.metadata["pruned_units"] == again.metadata["pruned_units"]  # seeded
    loaded = load_patch(patch.save(tmp_path / "p.safetensors"))
    assert loaded.kind == "delta" and loaded.metadata["pruned_units"] == \
        patch.metadata["pruned_units"]
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)


def test_the_kept_prompts_never_name_the_target():
    groups = kept_groups(PruneConfig(kept_set="common"), [Concept("a dog")])
    assert groups and not any("dog" in p for _, ps in groups for p in ps)
    world = kept_groups(PruneConfig(kept_set="conceptworld", kept_prompts=3),
                        [Concept("star")])
    assert len(world) > 10 and not any("star" in p.split() for _, ps in world for p in ps)


def test_without_images_the_units_are_read_on_the_base_models_own_samples():
    pipe = make_tiny_pipeline("sd1")
    patch = prune(pipe, [Concept("star")], QUICK, progress=False)
    assert patch.metadata["concept_source"] == ["base samples"]
    assert patch.metadata["units_pruned"] >= 1


@pytest.mark.parametrize(("values", "message"), [
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 0.7}, "fraction"),
    ({"sites": ("attn",)}, "sites"),
    ({"min_ratio": 1.0}, "min_ratio"),
    ({"timesteps": (1.5,)}, "timesteps"),
    ({"kept_set": "mine"}, "kept_set"),
    ({"score": "magnitude"}, "score"),
    ({"kept_prompts": 0}, "kept_prompts"),
    ({"concept_samples": 0}, "concept_samples"),
    ({"kept_set": ""}, "nothing to keep"),
    ({"preserve": ("",)}, "preserved prompt is empty"),
])
def test_prune_refuses_bad_settings(values, message):
    with pytest.raises(FmnError, match=message):
        PruneConfig(**values)


def test_a_concept_no_unit_is_alone_for_prunes_nothing_and_says_so(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    strict = PruneConfig(kept_set="", preserve=("a photo of a cat",), sample_steps=2,
                         timesteps=(0.5,), min_ratio=1000.0)
    with pytest.warns(UserWarning, match="nothing pruned"):
        patch = prune(pipe, [Concept("star")], strict, progress=False)
    assert patch.tensors == {} and patch.metadata["units_pruned"] == 0
    loaded = load_patch(patch.save(tmp_path / "none.safetensors"))
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    loaded.apply(pipe)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    loaded.remove(pipe)
