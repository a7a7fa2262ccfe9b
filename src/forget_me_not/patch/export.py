"""Patches for other tools (kohya / A1111 / ComfyUI keys) and for people (`describe`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.files import write_atomic
from forget_me_not.patch.core import Patch
from forget_me_not.patch.keys import METADATA_KEY

# -- kohya / A1111 / ComfyUI format -------------------------------------------------------------

KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                      "embedded": "sd_v1"}


def kohya_key(module: str) -> str:
    """diffusers module name -> kohya LoRA name ("lora_unet_" + dots as underscores).

    This is the naming kohya's sd-scripts write for diffusers-layout UNets, which A1111 and
    ComfyUI map onto their own layers (for SD 1.x/2.x and SDXL alike).
    """
    return "lora_unet_" + module.replace(".", "_")


def to_kohya(patch: Patch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of the patch in kohya's LoRA format: lora_down / lora_up / alpha."""
    if patch.kind == "embedding":
        raise FmnError(
            f"patch {patch.name!r} changes token embeddings of the text encoder, which the "
            "kohya LoRA format cannot carry: merge it into a pipeline with `fmn patch merge`"
        )
    if patch.kind != "lora":
        raise FmnError(
            f"patch {patch.name!r} holds full-weight deltas: turn it into a LoRA first with "
            "`fmn patch extract --rank R`, then convert that"
        )
    if patch.has_rows:
        warnings.warn(
            f"patch {patch.name!r} also changes token-embedding rows, which the kohya format "
            "cannot carry: the kohya file holds its UNet LoRA only",
            stacklevel=2,
        )
    alpha = float(patch.lora_config.get("lora_alpha", patch.rank))
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in patch.lora_pairs().items():
        name = kohya_key(module)
        tensors[f"{name}.lora_down.weight"] = a.float().contiguous()  # (r, in)
        tensors[f"{name}.lora_up.weight"] = b.float().contiguous()  # (out, r)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    _check_kohya_names(patch, tensors)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(patch.rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": KOHYA_BASE_VERSION.get(patch.family or "", ""),
        METADATA_KEY: json.dumps({**patch.metadata, "kind": "kohya", "name": patch.name},
                                 sort_keys=True, default=str),
    }
    return tensors, header


def _check_kohya_names(patch: Patch, tensors: dict[str, torch.Tensor]) -> None:
    """Kohya names lose the dots: make sure diffusers' own reader maps each one back."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
    except ImportError:  # a diffusers without it: nothing to check against
        return
    for module in patch.lora_pairs():
        back = _convert_unet_lora_key(f"{kohya_key(module)}.lora_down.weight")
        back = back.replace(".processor.", ".").replace("_lora.down.weight", "")
        back = back.replace(".lora.down.weight", "").replace("to_out", "to_out.0")
        back = back.replace("to_out.0.0", "to_out.0")
        if back != module:
            raise FmnError(
                f"module {module} has no unambiguous kohya name ({kohya_key(module)} reads back "
                f"as {back}): this patch cannot be exported to the kohya format"
            )


def save_kohya(patch: Patch, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FmnError(f"kohya file {path} must end in .safetensors: rename the output")
    if not path.parent.is_dir():
        raise FmnError(f"output folder {path.parent} does not exist: create it first")
    tensors, header = to_kohya(patch)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header), "patch")


# -- description --------------------------------------------------------------------------------


def describe(patch: Patch, path: str | Path | None = None) -> dict[str, Any]:
    """What a patch is: concepts, family, base hash, kind, rank, size, settings, versions."""
    n_params = sum(v.numel() for v in patch.tensors.values())
    if patch.kind == "lora":
        modules = sorted(patch.lora_pairs())
    elif patch.kind == "embedding":
        modules = [f"{enc}.token_embedding" for enc in patch.token_rows()]
    else:
        modules = sorted({k.removeprefix("unet.").rpartition(".")[0] for k in patch.unet_tensors})
    info: dict[str, Any] = {
        "name": patch.name,
        "kind": patch.kind,
        "concepts": [c.get("name") for c in patch.metadata.get("concepts", [])],
        "family": patch.family,
        "base_model_hash": patch.metadata.get("base_model_hash"),
        "rank": patch.rank,
        "lora_alpha": (patch.lora_config or {}).get("lora_alpha"),
        "modules": len(modules),
        "tensors": len(patch.tensors),
        "parameters": n_params,
        "bytes": Path(path).stat().st_size if path else 4 * n_params,
        "strength": patch.metadata.get("strength", 1.0),
        "method": patch.metadata.get("method"),
        "recipe": patch.metadata.get("recipe"),
        "train": patch.metadata.get("train"),
        "steps": patch.metadata.get("steps"),
        "seed": patch.metadata.get("seed"),
        "settings": patch.metadata.get("settings"),
        "versions": patch.metadata.get("versions"),
    }
    if patch.has_rows and patch.kind != "embedding":
        info["token_rows"] = {enc: int(ids.numel()) for enc, (ids, _) in patch.token_rows().items()}
    for key in ("parts", "extraction", "correction", "preset", "tokens", "recipe_parts",
                "scope"):
        if key in patch.metadata:
            info[key] = patch.metadata[key]
    if "placebo_of" in patch.metadata:
        info["placebo"] = {"of": patch.metadata["placebo_of"],
                           "seed": patch.metadata.get("placebo_seed")}
    return info
