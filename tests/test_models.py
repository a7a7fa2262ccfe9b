"""Pipeline loading: every source kind, family detection, single-file round trip, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch

from forget_me_not import models
from forget_me_not.errors import FmnError
from forget_me_not.models import (
    detect_family,
    family_from_state_dict,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    save_single_file,
)


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, name, None), getattr(b, name, None)
        if ma is None:
            assert mb is None
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_folder_loads_with_family(tiny_pipeline_dir, family):
    pipe = load_pipeline(tiny_pipeline_dir(family), device="cpu", dtype="fp32")
    assert pipe.fmn_family == family == detect_family(pipe)
    assert pipe.unet.dtype == torch.float32


def test_single_file_round_trip(tiny_pipeline_dir, family, tmp_path):
    folder = tiny_pipeline_dir(family)
    pipe = load_pipeline(folder, device="cpu")
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    back = load_pipeline(path, device="cpu", config=folder)
    assert back.fmn_family == family
    _same_weights(pipe, back)


def test_state_dict_family_rules():
    assert family_from_state_dict({"conditioner.embedders.1.model.ln_final.weight": (8,)}) == "sdxl"
    assert family_from_state_dict({"cond_stage_model.model.ln_final.weight": (8,)}) == "sd2"
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert family_from_state_dict({k: (320, 1024)}) == "sd2"
    assert family_from_state_dict({k: (320, 768)}) == "sd1"


def test_embedded_marker(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "world"
    shutil.copytree(tiny_pipeline_dir("sd1"), folder)
    (folder / models.WORLD_MARKER).write_text("{}")
    assert load_pipeline(folder, device="cpu").fmn_family == "embedded"


def test_embedded_missing_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "embedded_model_dir", lambda: tmp_path / "nothing")
    with pytest.raises(FmnError, match="embedded ConceptWorld weights are missing"):
        load_pipeline("embedded", device="cpu")


def test_embedded_loads_when_shipped():
    if not (models.embedded_model_dir() / "model_index.json").is_file():
        pytest.skip("ConceptWorld weights not built yet")
    assert load_pipeline("embedded", device="cpu").fmn_family == "embedded"


def test_hub_id_offline_is_clear():
    with pytest.raises(FmnError, match="model hub"):
        load_pipeline("nobody-here/no-such-model", device="cpu")


def test_single_file_without_config_offline(tiny_pipeline_dir, tmp_path):
    path = save_single_file(load_pipeline(tiny_pipeline_dir("sd1")), tmp_path / "m.safetensors")
    with pytest.raises(FmnError, match="--config"):
        load_pipeline(path, device="cpu")


def test_pickle_needs_consent_then_warns(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tiny_pipeline_dir("sd1")
    st = save_single_file(load_pipeline(folder), tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(st)}, ckpt)
    with pytest.raises(FmnError, match="pickle"):
        load_pipeline(ckpt, device="cpu", config=folder)
    with pytest.warns(UserWarning, match="pickle"):
        pipe = load_pipeline(ckpt, device="cpu", config=folder, allow_pickle=True)
    assert pipe.fmn_family == "sd1"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device(bad):
    with pytest.raises(FmnError, match="unknown device"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable():
    with pytest.raises(FmnError, match="CUDA is not available"):
        resolve_device("cuda")


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(FmnError, match="unknown dtype"):
        resolve_dtype("float8", cpu)
