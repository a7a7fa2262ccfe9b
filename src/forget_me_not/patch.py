"""The patch: what re-steering trained, as one safetensors file, applied to and removed from a pipe.

Two kinds:
- "lora": peft LoRA weights in diffusers' key format ("unet.<module>.lora_A.weight"), with the
  LoraConfig in the header under "lora_adapter_metadata", so plain diffusers loads the file
  with `pipe.load_lora_weights(path)`. Applied as a named peft adapter, so several patches
  stack (each its own adapter name and scale).
- "delta": trained-minus-original tensors of full weights ("unet.<param name>"), for
  `train="xattn"` / `"unet"`. Applying adds them; the originals are kept, so removal is exact.

Our own metadata (concepts, family, base hash, settings, versions) is JSON in the header under
"forget_me_not".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError

METADATA_KEY = "forget_me_not"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers reads the LoraConfig from here
FORMAT_VERSION = 1
KINDS = ("lora", "delta")
_REGISTRY_ATTR = "_fmn_patches"  # on the UNet: name -> applied state, in application order


# -- facts about a pipeline -------------------------------------------------------------------


def family_of(pipe: Any) -> str:
    """The model family ("sd1", "sd2", "sdxl", "embedded"), as models.detect_family says."""
    from forget_me_not.models import detect_family

    return detect_family(pipe)


def model_hash(pipe: Any) -> str:
    """A cheap, stable fingerprint of the UNet: its config plus a few weights' leading values.

    Values are rounded through float16 so a model loaded in float16 hashes like its float32
    original. Not a security hash: it tells "same base model" from "another one".
    """
    unet = pipe.unet
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = dict(unet.named_parameters())
    names = sorted(n for n in params if "lora_" not in n)
    for name in (names[0], names[len(names) // 2], names[-1]):
        p = params[name].detach().flatten()[:16].to("cpu", torch.float16)
        h.update(name.replace("base_layer.", "").encode())
        h.update(p.numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    from forget_me_not import __version__

    return {
        "forget_me_not": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# -- the patch ----------------------------------------------------------------------------------


@dataclass
class Patch:
    """Trained tensors plus the metadata needed to apply, check and reproduce them."""

    kind: str  # "lora" | "delta"
    tensors: dict[str, torch.Tensor]  # "unet.<...>" -> tensor, as saved
    metadata: dict[str, Any] = field(default_factory=dict)
    lora_config: dict[str, Any] | None = None  # LoraConfig kwargs (r, lora_alpha, targets)
    name: str = "fmn"  # adapter name when applied; unique per applied patch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FmnError(f"unknown patch kind {self.kind!r}: expected one of {KINDS}")
        if self.kind == "lora" and not self.lora_config:
            raise FmnError("a LoRA patch needs its LoRA config (rank, alpha, target modules)")
        bad = [k for k in self.tensors if not k.startswith("unet.")]
        if bad:
            raise FmnError(f"patch tensor names must start with 'unet.': {bad[:3]}")

    @property
    def family(self) -> str | None:
        return self.metadata.get("family")

    # -- files --

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file atomically (temp file in the same folder, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise FmnError(f"patch file {path} must end in .safetensors: rename the output")
        if not path.parent.is_dir():
            raise FmnError(f"output folder {path.parent} does not exist: create it first")
        header = {
            "format": "pt",
            METADATA_KEY: json.dumps(
                {**self.metadata, "kind": self.kind, "name": self.name,
                 "format_version": FORMAT_VERSION},
                sort_keys=True, default=str,
            ),
        }
        if self.lora_config is not None:
            # diffusers unpacks these per component prefix, e.g. "unet.r" -> LoraConfig(r=...)
            header[LORA_METADATA_KEY] = json.dumps(
                {f"unet.{k}": v for k, v in self.lora_config.items()}, sort_keys=True
            )
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- applying --

    def apply(self, pipe: Any, scale: float = 1.0) -> None:
        """Add the patch to `pipe`'s UNet, scaled. Refuses a patch made for another family."""
        self._check_family(pipe)
        unet = pipe.unet
        registry = _registry(unet)
        if self.name in registry:
            raise FmnError(
                f"patch {self.name!r} is already applied to this pipeline: remove it first, "
                "or give the second copy another name"
            )
        if self.kind == "lora":
            self._apply_lora(unet, scale)
        else:
            self._apply_delta(unet, scale)

    def remove(self, pipe: Any) -> None:
        """Take the patch off again; the base model's outputs come back exactly."""
        unet = pipe.unet
        registry = _registry(unet)
        if self.name not in registry:
            raise FmnError(f"patch {self.name!r} is not applied to this pipeline")
        if self.kind == "lora":
            self._remove_lora(unet)
        else:
            self._remove_delta(unet)

    def is_applied(self, pipe: Any) -> bool:
        return self.name in _registry(pipe.unet)

    def _check_family(self, pipe: Any) -> None:
        family = family_of(pipe)
        if self.family and family != self.family:
            raise FmnError(
                f"this patch was made for a {self.family} model but the pipeline is {family}: "
                f"apply it to a {self.family} model"
            )
        base = self.metadata.get("base_model_hash")
        if base and base != model_hash(pipe):
            warnings.warn(
                f"patch {self.name!r} was trained on another {family} model "
                "(base model hash differs); applying it anyway",
                stacklevel=3,
            )

    def _apply_lora(self, unet: Any, scale: float) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        before = _active_adapters(unet)
        with warnings.catch_warnings():
            # peft warns whenever a second adapter is added: stacking is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(LoraConfig(**self.lora_config), adapter_name=self.name)
        state = {k.removeprefix("unet."): v for k, v in self.tensors.items()}
        result = set_peft_model_state_dict(unet, state, adapter_name=self.name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            unet.delete_adapters(self.name)
            raise FmnError(
                f"patch {self.name!r} does not fit this UNet ({len(unexpected)} unknown "
                f"weights, e.g. {unexpected[0]}): apply it to the model it was made for"
            )
        _registry(unet)[self.name] = {"kind": "lora", "scale": float(scale)}
        _activate(unet, before)

    def _remove_lora(self, unet: Any) -> None:
        before = [n for n in _active_adapters(unet) if n != self.name]
        _registry(unet).pop(self.name)
        unet.delete_adapters(self.name)
        if not getattr(unet, "peft_config", None):
            # No adapter left: unwrap the peft layers so the UNet is the base model again.
            from diffusers.utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(unet)
            unet._hf_peft_config_loaded = None
        else:
            _activate(unet, before)

    def _apply_delta(self, unet: Any, scale: float) -> None:
        stash: dict[str, torch.Tensor] = {}
        params = [(_param(unet, k.removeprefix("unet.")), k) for k in self.tensors]
        with torch.no_grad():
            for p, key in params:
                stash[key] = p.detach().to("cpu", copy=True)
            for p, key in params:
                p.add_(self.tensors[key].to(p.device, torch.float32).mul(scale).to(p.dtype))
        _registry(unet)[self.name] = {"kind": "delta", "scale": float(scale), "stash": stash}

    def _remove_delta(self, unet: Any) -> None:
        registry = _registry(unet)
        names = list(registry)
        later = [registry[n] for n in names[names.index(self.name) + 1 :]
                 if registry[n]["kind"] == "delta"]
        entry = registry.pop(self.name)
        with torch.no_grad():
            for key, original in entry["stash"].items():
                p = _param(unet, key.removeprefix("unet."))
                touched_later = any(key in e["stash"] for e in later)
                if not touched_later:
                    p.copy_(original.to(p.device))  # exact: the weights as they were
                    continue
                # Another delta patch went on after this one: take ours out arithmetically and
                # fix what that patch will restore.
                delta = self.tensors[key].to(torch.float32) * entry["scale"]
                p.sub_(delta.to(p.device, p.dtype))
                for e in later:
                    if key in e["stash"]:
                        e["stash"][key] = (e["stash"][key].float() - delta).to(
                            e["stash"][key].dtype)


def _registry(unet: Any) -> dict[str, dict[str, Any]]:
    registry = getattr(unet, _REGISTRY_ATTR, None)
    if registry is None:
        registry = {}
        object.__setattr__(unet, _REGISTRY_ATTR, registry)
    return registry


def _active_adapters(unet: Any) -> list[str]:
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    return list(unet.active_adapters())


def _activate(unet: Any, others: list[str]) -> None:
    """Make every applied LoRA patch active at its scale, plus adapters active before (at 1.0)."""
    registry = _registry(unet)
    ours = [n for n, e in registry.items() if e["kind"] == "lora"]
    names = [n for n in others if n not in registry] + ours
    weights = [registry[n]["scale"] if n in registry else 1.0 for n in names]
    if names:
        unet.set_adapters(names, weights)


def _param(unet: Any, name: str) -> torch.nn.Parameter:
    """A UNet parameter by name, also when a peft layer wraps its module (".base_layer.")."""
    try:
        return unet.get_parameter(name)
    except AttributeError:
        module, _, leaf = name.rpartition(".")
        try:
            return unet.get_parameter(f"{module}.base_layer.{leaf}")
        except AttributeError as e:
            raise FmnError(
                f"this UNet has no weight {name}: apply the patch to the model it was made for"
            ) from e


def load_patch(path: str | Path) -> Patch:
    """Read a patch written by `Patch.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FmnError(f"patch file {path} does not exist: pass a .safetensors patch")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for damaged files
        raise FmnError(f"patch file {path} is not a readable safetensors file ({e})") from e
    if METADATA_KEY not in header:
        raise FmnError(
            f"{path} is not a forget-me-not patch (no '{METADATA_KEY}' metadata): for a plain "
            "diffusers LoRA use pipe.load_lora_weights"
        )
    meta = json.loads(header[METADATA_KEY])
    kind = meta.pop("kind")
    name = meta.pop("name", "fmn")
    meta.pop("format_version", None)
    lora_config = None
    if LORA_METADATA_KEY in header:
        packed = json.loads(header[LORA_METADATA_KEY])
        lora_config = {k.removeprefix("unet."): v for k, v in packed.items()
                       if k.startswith("unet.")}
    return Patch(kind=kind, tensors=tensors, metadata=meta, lora_config=lora_config, name=name)
