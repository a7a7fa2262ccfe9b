"""RECE on tiny SD 1.x, 2.x and SDXL pipelines: UCE's edit, then rounds that undo an attack."""

from __future__ import annotations

import pytest
import torch

from forget_me_not.api import forget
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.rece.config import ReceConfig
from forget_me_not.methods.rece.train import adversarial_states
from forget_me_not.methods.rece.train import train as rece
from forget_me_not.methods.uce.config import UceConfig
from forget_me_not.methods.uce.train import Encoded, edited_layers
from forget_me_not.methods.uce.train import train as uce
from forget_me_not.patch import load_patch
from tiny_pipelines import make_tiny_pipeline


def _delta(patch, name: str) -> torch.Tensor:
    return patch.to_delta().tensors[f"unet.{name}.weight"].double()


def test_rece_without_rounds_is_uces_edit_bit_for_bit():
    pipe = make_tiny_pipeline("sd1")
    settings = dict(anchor="moon", preserve=("cat",))
    ours = rece(pipe, [Concept("star")], ReceConfig(epochs=0, **settings), progress=False)
    theirs = uce(pipe, [Concept("star")], UceConfig(**settings))
    assert ours.kind == theirs.kind and ours.tensors.keys() == theirs.tensors.keys()
    assert all(torch.equal(ours.tensors[k], theirs.tensors[k]) for k in ours.tensors)
    assert ours.metadata["method"] == "rece" and ours.metadata["steps"] == 0


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_round_takes_away_the_states_that_drew_the_concept_after_uce(family):
    pipe = make_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    config = ReceConfig(epochs=1, regular_scale=1e-3)
    first = uce(pipe, [Concept("star")], config)
    patch = rece(pipe, [Concept("star")], config, progress=False)
    assert {n: p for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])} == {}
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in patch.tensors)
    layers = edited_layers(pipe, config.targets)
    base = [m.weight.detach().double() for _, m in layers]
    after_uce = [w + _delta(first, n) for w, (n, _) in zip(base, layers, strict=True)]
    after_rece = [w + _delta(patch, n) for w, (n, _) in zip(base, layers, strict=True)]
    c = Encoded(pipe)("star").double()
    found = adversarial_states(c, after_uce, base, config.regular_scale)  # the attack on UCE

    def brought_back(weights):  # how far the found states are from the base's outputs for c
        return sum(float((found @ w.T - c @ b.T).norm())
                   for w, b in zip(weights, base, strict=True))

    assert brought_back(after_rece) > 2 * brought_back(after_uce)
    assert patch.metadata["round_gaps"] and patch.metadata["steps"] == 1


def test_rece_through_forget_saves_and_loads(tmp_path):
    pipe = make_tiny_pipeline("sd1")
    patch = forget(pipe, Concept("star"), method="rece", sets=["epochs=2"], progress=False)
    assert patch.metadata["recipe"] == "rece" and len(patch.metadata["round_gaps"]) == 2
    loaded = load_patch(patch.save(tmp_path / "p.safetensors"))
    assert loaded.metadata["method"] == "rece" and loaded.tensors.keys() == patch.tensors.keys()


@pytest.mark.parametrize("sets,message", [(["epochs=-1"], "epochs must be"),
                                          (["round_erase_scale=0"], "round_erase_scale 0")])
def test_rece_refuses_bad_settings_before_work(sets, message):
    pipe = make_tiny_pipeline("sd1")
    with pytest.raises(FmnError, match=message):
        forget(pipe, Concept("star"), method="rece", sets=sets, progress=False)
