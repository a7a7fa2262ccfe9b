"""Patches: save/load, apply/remove round trips, stacking, plain diffusers loading, families."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.patch import load_patch, model_hash
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any, unet_probe


def _patch(train: str, concept: str = "star", lr: float = 1e-2):
    cfg = fmn_config(steps=2, reference="noise", train=train, lr=lr)
    return train_any(make_tiny_pipeline("sd1"), [Concept(concept)], cfg, progress=False)


@pytest.fixture(scope="module")
def lora_patch():
    return _patch("lora")


@pytest.fixture(scope="module")
def xattn_patch():
    return _patch("xattn", lr=1e-3)


def test_save_load_round_trip(tmp_path, lora_patch, xattn_patch):
    for patch in (lora_patch, xattn_patch):
        path = patch.save(tmp_path / f"{patch.kind}.safetensors")
        loaded = load_patch(path)
        assert loaded.kind == patch.kind and loaded.name == patch.name
        assert loaded.tensors.keys() == patch.tensors.keys()
        assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
        assert loaded.metadata["concepts"] == patch.metadata["concepts"]
        assert loaded.metadata["base_model_hash"] == patch.metadata["base_model_hash"]
        assert loaded.lora_config == patch.lora_config
    assert [p.name for p in tmp_path.iterdir()] != []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("which", ["lora", "xattn"])
def test_apply_remove_round_trip_is_exact(which, lora_patch, xattn_patch):
    patch = lora_patch if which == "lora" else xattn_patch
    pipe = make_tiny_pipeline("sd1")
    base = unet_probe(pipe)
    patch.apply(pipe)
    patched = unet_probe(pipe)
    assert not torch.allclose(base, patched)
    with pytest.raises(FmnError, match="already applied"):
        patch.apply(pipe)
    patch.remove(pipe)
    assert torch.equal(base, unet_probe(pipe))
    patch.apply(pipe, scale=0.5)
    half = unet_probe(pipe)
    assert not torch.allclose(half, patched)
    patch.remove(pipe)
    assert torch.equal(base, unet_probe(pipe))


def test_stacking_and_removal_in_any_order(lora_patch, xattn_patch):
    second = _patch("lora", concept="moon")
    assert second.name != lora_patch.name
    pipe = make_tiny_pipeline("sd1")
    base = unet_probe(pipe)
    lora_patch.apply(pipe)
    only_first = unet_probe(pipe)
    second.apply(pipe)
    xattn_patch.apply(pipe)
    both = unet_probe(pipe)
    assert not torch.allclose(both, only_first)
    xattn_patch.remove(pipe)
    second.remove(pipe)
    assert torch.allclose(unet_probe(pipe), only_first, atol=1e-6)
    lora_patch.remove(pipe)
    assert torch.equal(base, unet_probe(pipe))


def test_plain_diffusers_load_lora_weights(tmp_path, lora_patch):
    path = lora_patch.save(tmp_path / "patch.safetensors")
    ours = make_tiny_pipeline("sd1")
    lora_patch.apply(ours)
    plain = make_tiny_pipeline("sd1")
    plain.load_lora_weights(str(path))  # no forget_me_not involved
    assert torch.allclose(unet_probe(ours), unet_probe(plain), atol=1e-6)


def test_other_family_refused_naming_both(lora_patch):
    pipe = make_tiny_pipeline("sdxl")
    with pytest.raises(FmnError, match="sd1 model but the pipeline is sdxl"):
        lora_patch.apply(pipe)


def test_bad_files(tmp_path, lora_patch):
    with pytest.raises(FmnError, match="does not exist"):
        load_patch(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FmnError, match="not a readable"):
        load_patch(tmp_path / "junk.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(FmnError, match="not a forget-me-not patch"):
        load_patch(tmp_path / "other.safetensors")
    with pytest.raises(FmnError, match=".safetensors"):
        lora_patch.save(tmp_path / "patch.bin")
    with pytest.raises(FmnError, match="does not exist"):
        lora_patch.save(tmp_path / "missing" / "patch.safetensors")


def test_model_hash_is_stable_and_discriminates():
    a, b = make_tiny_pipeline("sd1"), make_tiny_pipeline("sd1")
    assert model_hash(a) == model_hash(b)
    assert model_hash(a) != model_hash(make_tiny_pipeline("sd1", seed=1))
    a.unet.half()
    assert model_hash(a) == model_hash(b)
