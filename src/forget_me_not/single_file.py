"""Writing a single-file checkpoint: the original LDM layout that A1111, ComfyUI and diffusers'
`from_single_file` read, converted from a diffusers pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.files import write_atomic
from forget_me_not.models import detect_family

# ---------------------------------------------------------------------------------------------
# writing a single-file checkpoint (original LDM layout, what A1111/ComfyUI and
# diffusers' from_single_file read)

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)


def _rename(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _unet_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise FmnError("per-block layer counts cannot be written as a single file; save a folder")
    direct = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    up_has_attn = {
        int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k
    }

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in direct:
            new = direct[key]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            first = 1 + b * (lpb + 1)  # input_blocks.0 is conv_in
            if kind == "resnets":
                new = (
                    f"input_blocks.{first + int(p[3])}.0.{_rename('.'.join(p[4:]), _RESNET_TO_LDM)}"
                )
            elif kind == "attentions":
                new = f"input_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
            else:  # downsamplers.0.conv.<w>
                new = f"input_blocks.{first + lpb}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                new = f"middle_block.{2 * int(p[2])}.{_rename('.'.join(p[3:]), _RESNET_TO_LDM)}"
            else:
                new = f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            first = b * (lpb + 1)
            if kind == "resnets":
                rest = _rename(".".join(p[4:]), _RESNET_TO_LDM)
                new = f"output_blocks.{first + int(p[3])}.0.{rest}"
            elif kind == "attentions":
                new = f"output_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
            else:  # the upsampler follows the attention when the block has one
                slot = 2 if b in up_has_attn else 1
                new = f"output_blocks.{first + lpb}.{slot}.conv.{p[-1]}"
        else:
            raise FmnError(f"cannot map UNet weight {key!r} to a single file; save a folder")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in direct:
            new = direct[key]
        elif p[1] == "down_blocks":
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"encoder.down.{p[2]}.block.{p[4]}.{rest}"
            else:
                new = f"encoder.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            ldm_block = n_up - 1 - int(p[2])  # LDM numbers decoder levels from the bottom
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"decoder.up.{ldm_block}.block.{p[4]}.{rest}"
            else:
                new = f"decoder.up.{ldm_block}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block":
            new = f"{p[0]}.mid.attn_1.{_rename('.'.join(p[4:]), _VAE_ATTN_TO_LDM)}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        else:
            raise FmnError(f"cannot map VAE weight {key!r} to a single file; save a folder")
        out["first_stage_model." + new] = value
    return out


def _text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as `text_model.…` / `text_projection.weight`, whatever transformers' nesting."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def _clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _text_model_keys(sd).items()}


def _openclip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sd = _text_model_keys(sd)
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies x @ proj
        elif key.startswith("text_model.encoder.layers."):
            p = key.split(".")
            layer, rest = p[3], ".".join(p[4:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                continue  # fused below
            out[f"{prefix}transformer.resblocks.{layer}.{_rename(rest, _OPENCLIP_LAYER)}"] = value
        else:
            raise FmnError(f"cannot map text-encoder weight {key!r} to a single file")
    layers = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")}
    for layer in layers:
        base = f"text_model.encoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            # OpenCLIP's nn.MultiheadAttention stores q, k, v stacked: (3 * hidden, hidden)
            qkv = [sd[f"{base}{n}_proj.{kind}"] for n in ("q", "k", "v")]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
    return out


def save_single_file(pipe, path: str | Path) -> Path:
    """Write `pipe` as one original-layout .safetensors checkpoint (UNet, VAE, text encoders)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FmnError(f"{path}: single-file checkpoints are written as .safetensors")
    family = detect_family(pipe)
    structure = "sd2" if pipe.unet.config.get("use_linear_projection") else "sd1"
    if getattr(pipe, "text_encoder_2", None) is not None:
        structure = "sdxl"

    tensors = _unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    tensors.update(_vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if structure == "sdxl":
        tensors.update(
            _clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        )
        tensors.update(
            _openclip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        )
    elif structure == "sd2":
        tensors.update(_openclip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        tensors.update(
            _clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
        )

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", "fmn_family": family}
    _check_writable_parent(path)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), "checkpoint")


def _check_writable_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FmnError(f"folder {parent} does not exist; create it first or pick another path")
    if not os.access(parent, os.W_OK):
        raise FmnError(f"folder {parent} is not writable; pick another output path")
