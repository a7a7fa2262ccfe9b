"""UCE and ESD on tiny SD 1.x, 2.x and SDXL pipelines: what changes, what is saved, diffusers."""

from __future__ import annotations

import pytest
import torch

from forget_me_not.api import forget
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.esd.config import EsdConfig
from forget_me_not.methods.esd.train import train as esd
from forget_me_not.methods.uce.config import UceConfig
from forget_me_not.methods.uce.train import text_state
from forget_me_not.methods.uce.train import train as uce
from forget_me_not.patch import load_patch
from tiny_pipelines import make_tiny_pipeline


def _layers(pipe):
    return {n: m for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_uce_moves_the_concept_to_its_anchor_and_touches_only_k_and_v(family):
    pipe = make_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    patch = uce(pipe, [Concept("star")], UceConfig(anchor="moon", preserve=("cat",)))
    assert {n: p for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])} == {}
    assert patch.kind == "lora" and patch.rank == 1 and patch.metadata["method"] == "uce"
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in patch.tensors)
    assert patch.metadata["reconstruction_error"] < 1e-6
    c, anchor = text_state(pipe, "star"), text_state(pipe, "moon")
    layers = _layers(pipe)
    gap_before = {n: float((m.weight @ c - m.weight @ anchor).detach().norm())
                  for n, m in layers.items()}
    patch.apply(pipe)
    gap_after = {n: float((m(c) - m.base_layer(anchor)).norm()) for n, m in _layers(pipe).items()}
    patch.remove(pipe)
    assert all(gap_after[n] < gap_before[n] for n in gap_before)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_uce_lora_loads_in_plain_diffusers_with_the_same_outputs(family, tmp_path):
    pipe = make_tiny_pipeline(family)
    patch = uce(pipe, [Concept("star"), Concept("heart")], UceConfig())
    assert patch.rank == 2  # both concepts in one solve
    path = patch.save(tmp_path / "uce.safetensors")
    prompt = "a photo of a star"
    kw = dict(num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    patch.apply(pipe)
    ours = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    patch.remove(pipe)
    plain = make_tiny_pipeline(family)
    plain.load_lora_weights(str(path))
    theirs = plain(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_uce_falls_back_to_deltas_when_the_rank_reaches_the_width_and_warns_when_singular():
    pipe = make_tiny_pipeline("sd1")
    patch = uce(pipe, [Concept("star")], UceConfig(states="tail", expand_prompts=True))
    assert patch.kind == "delta" and "stored as deltas" in patch.metadata["note"]
    with pytest.warns(UserWarning, match="condition number"):
        uce(pipe, [Concept("star")], UceConfig(lamb=0.0))
    with pytest.raises(FmnError, match="anchor 'qwxz'"):
        uce(pipe, [Concept("star")], UceConfig(anchor="qwxz"))


def test_uce_through_forget_records_the_recipe(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    patch = forget(pipe, Concept("star"), method="uce", sets=["preserve_set=''"], progress=False)
    assert patch.metadata["recipe"] == "uce" and patch.metadata["method"] == "uce"
    assert load_patch(patch.save(tmp_path / "p.safetensors")).rank == 1


@pytest.mark.parametrize("train,inside", [("xattn", True), ("noxattn", False)])
def test_esd_trains_only_its_layers(train, inside):
    pipe = make_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    patch = esd(pipe, [Concept("star")], EsdConfig(train=train, iterations=2, sample_steps=2,
                                                   lr=1e-3), progress=False)
    assert patch.kind == "delta" and patch.tensors
    assert all((".attn2." in k) == inside for k in patch.tensors)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert len(patch.metadata["losses"]) == 2


def test_esd_lora_on_sdxl_and_a_nan_loss_writes_nothing(monkeypatch):
    pipe = make_tiny_pipeline("sdxl")
    patch = esd(pipe, [Concept("star")], EsdConfig(train="lora", iterations=1, sample_steps=2),
                progress=False)
    assert patch.kind == "lora" and all("lora_" in k and ".attn2." in k for k in patch.tensors)
    import forget_me_not.methods.esd.train as module

    monkeypatch.setattr(module.F, "mse_loss", lambda a, b: torch.tensor(float("nan")))
    with pytest.raises(FmnError, match="ESD loss became nan"):
        esd(pipe, [Concept("star")], EsdConfig(iterations=1, sample_steps=2), progress=False)
    assert not any(p.requires_grad for p in pipe.unet.parameters())
