"""The patch: what re-steering trained, as one safetensors file, applied to and removed from a pipe.

Three kinds:
- "lora": peft LoRA weights in diffusers' key format ("unet.<module>.lora_A.weight"), with the
  LoraConfig in the header under "lora_adapter_metadata", so plain diffusers loads the file
  with `pipe.load_lora_weights(path)`. Applied as a named peft adapter, so several patches
  stack (each its own adapter name and scale).
- "delta": trained-minus-original tensors of full weights ("unet.<param name>"), for
  `train="xattn"` / `"unet"`. Applying adds them; the originals are kept, so removal is exact.
- "embedding": changes to a few rows of the text encoder(s)' token-embedding table (what
  `fmn correct` trains by default, and `fmn forget --train tokens`): "<encoder>.token_ids"
  (k,) and "<encoder>.token_delta" (k, dim) per text encoder ("text_encoder",
  "text_encoder_2"). Every prompt without those tokens is untouched; applying adds the rows,
  removal restores them exactly.

A LoRA or delta patch may carry token rows as well (`--train lora+tokens`): the UNet change
and the rows go on and come off together. Such a file is no plain diffusers LoRA any more
(diffusers refuses keys without "lora"); `to_kohya` keeps its UNet half.

Our own metadata (concepts, family, base hash, settings, versions) is JSON in the header under
"forget_me_not".

Beyond one patch on one model: `scaled` (strength), `stack_patches` (several patches in one
file, exact), `unstack` (take a stacked part out again), `to_delta` (a LoRA as full-weight
deltas), `extract_lora` (a delta patch as a LoRA by truncated SVD, error reported),
`merge_into` (fuse into the weights for a full pipeline folder), `to_kohya` (the key format
A1111 and ComfyUI read) and `describe` (what `fmn patch info` prints).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.files import write_atomic
from forget_me_not.patch.applying import (
    add_rows,
    applied_registry,
    apply_delta,
    apply_lora,
    check_fit,
    remove_delta,
    remove_lora,
    remove_rows,
)
from forget_me_not.patch.keys import (
    FORMAT_VERSION,
    KINDS,
    LORA_METADATA_KEY,
    MAX_STRENGTH,
    METADATA_KEY,
    is_row_key,
)

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

    kind: str  # "lora" | "delta" | "embedding"
    tensors: dict[str, torch.Tensor]  # "unet.<...>" (or "<text encoder>.token_*") -> tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    lora_config: dict[str, Any] | None = None  # LoraConfig kwargs (r, lora_alpha, targets)
    name: str = "fmn"  # adapter name when applied; unique per applied patch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FmnError(f"unknown patch kind {self.kind!r}: expected one of {KINDS}")
        if self.kind == "lora" and not self.lora_config:
            raise FmnError("a LoRA patch needs its LoRA config (rank, alpha, target modules)")
        if self.kind == "embedding" or self.has_rows:
            self.token_rows()  # checks names and shapes
            if self.kind == "embedding":
                return
        bad = [k for k in self.tensors if not k.startswith("unet.") and not is_row_key(k)]
        if bad:
            raise FmnError(f"patch tensor names must start with 'unet.': {bad[:3]}")

    @property
    def family(self) -> str | None:
        return self.metadata.get("family")

    @property
    def has_rows(self) -> bool:
        """Whether the patch changes token-embedding rows (all an embedding patch does)."""
        return any(is_row_key(k) for k in self.tensors)

    @property
    def unet_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that change the UNet (none for an embedding patch)."""
        return {k: v for k, v in self.tensors.items() if k.startswith("unet.")}

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
        return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header), "patch")

    # -- applying --

    def apply(self, pipe: Any, scale: float = 1.0) -> None:
        """Add the patch to `pipe`'s UNet, scaled. Refuses a patch made for another family."""
        scale = check_strength(scale)
        self.check_family(pipe)
        unet = pipe.unet
        registry = applied_registry(unet)
        if self.name in registry:
            raise FmnError(
                f"patch {self.name!r} is already applied to this pipeline: a patch goes on "
                "once, in a stack as on a pipeline; to strengthen it, apply it with a strength"
            )
        # Rows are checked before the UNet changes: a misfit changes nothing.
        tables = check_fit(pipe, self) if self.has_rows else {}
        if self.kind == "lora":
            apply_lora(self, unet, scale)
        elif self.kind == "delta":
            apply_delta(self, unet, scale)
        else:
            registry[self.name] = {"kind": "embedding", "scale": float(scale)}
        if self.has_rows:
            registry[self.name].update({
                "row_stash": add_rows(tables, self, scale),
                "patch_ids": {enc: ids for enc, (ids, _) in self.token_rows().items()},
            })

    def remove(self, pipe: Any) -> None:
        """Take the patch off again; the base model's outputs come back exactly."""
        unet = pipe.unet
        registry = applied_registry(unet)
        if self.name not in registry:
            raise FmnError(f"patch {self.name!r} is not applied to this pipeline")
        if self.has_rows:
            remove_rows(self, pipe)
        if self.kind == "lora":
            remove_lora(self, unet)
        elif self.kind == "delta":
            remove_delta(self, unet)
        else:
            registry.pop(self.name)

    def is_applied(self, pipe: Any) -> bool:
        return self.name in applied_registry(pipe.unet)

    # -- views and transforms --

    @property
    def rank(self) -> int | None:
        return int(self.lora_config["r"]) if self.lora_config else None

    @property
    def lora_scaling(self) -> float:
        """peft's multiplier on B @ A: lora_alpha / r."""
        if not self.lora_config:
            raise FmnError("only a LoRA patch has a LoRA scaling")
        return float(self.lora_config.get("lora_alpha", self.rank)) / float(self.rank)

    def lora_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (A (r, in), B (out, r)) of a LoRA patch."""
        if self.kind != "lora":
            raise FmnError(f"patch {self.name!r} is a {self.kind} patch, not a LoRA")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.unet_tensors.items():
            module, _, leaf = key.removeprefix("unet.").rpartition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise FmnError(
                    f"patch {self.name!r} holds {key}, which is no LoRA weight: the file is "
                    "damaged or not a forget-me-not LoRA; make it again"
                )
            pairs.setdefault(module, {})[leaf[0]] = value
        out = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise FmnError(
                    f"patch {self.name!r} is damaged: {module} lacks its lora_"
                    f"{'B' if 'A' in ab else 'A'} weight; make the patch again"
                )
            out[module] = (ab["A"], ab["B"])
        return out

    def token_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text encoder -> (token ids (k,), row deltas (k, dim)) of the rows the patch changes."""
        if self.kind != "embedding" and not self.has_rows:
            raise FmnError(f"patch {self.name!r} is a {self.kind} patch without token rows")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if self.kind != "embedding" and key.startswith("unet."):
                continue
            if not is_row_key(key):
                raise FmnError(
                    f"patch {self.name!r} holds {key}, which is no token-embedding row: the file "
                    "is damaged or not a forget-me-not embedding patch; make it again"
                )
            encoder, _, leaf = key.partition(".")
            parts.setdefault(encoder, {})[leaf] = value
        out = {}
        for encoder, pair in sorted(parts.items()):
            ids, delta = pair.get("token_ids"), pair.get("token_delta")
            if (ids is None or delta is None or ids.ndim != 1 or delta.ndim != 2
                    or delta.shape[0] != ids.shape[0] or ids.is_floating_point()):
                raise FmnError(
                    f"patch {self.name!r} is damaged: {encoder} needs token_ids (k,) and "
                    "token_delta (k, dim) that agree; make the patch again"
                )
            out[encoder] = (ids.long(), delta)
        if not out:
            raise FmnError(f"embedding patch {self.name!r} holds no token rows: make it again")
        return out

    def check_integrity(self) -> None:
        """Refuse a LoRA whose weights disagree with its rank (a damaged or edited file)."""
        if self.kind != "lora":
            return
        for key in ("rank_pattern", "alpha_pattern"):
            if self.lora_config.get(key):
                raise FmnError(f"LoRA patches with a {key} are not supported: use one rank")
        r = self.rank
        for module, (a, b) in self.lora_pairs().items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                raise FmnError(
                    f"patch {self.name!r} is damaged: {module} has LoRA shapes "
                    f"{tuple(a.shape)} / {tuple(b.shape)} for rank {r}; make the patch again"
                )

    def scaled(self, strength: float) -> Patch:
        """A copy whose effect is `strength` times this one's (a new file to ship)."""
        strength = check_strength(strength)
        def scales(key: str) -> bool:
            if is_row_key(key):
                return key.endswith(".token_delta")
            return self.kind == "delta" or ".lora_B." in key

        tensors = {k: (v * strength if scales(k) else v.clone()) for k, v in self.tensors.items()}
        meta = {**self.metadata, "strength": float(self.metadata.get("strength", 1.0)) * strength}
        return Patch(self.kind, tensors, meta, dict(self.lora_config or {}) or None,
                     adapter_name(f"{self.name}_x{strength:g}"))

    def to_delta(self) -> Patch:
        """The same change as full-weight deltas ("unet.<module>.weight" = scaling * B @ A)."""
        if self.kind == "delta":
            return self
        if self.kind == "embedding":
            raise FmnError(
                f"patch {self.name!r} changes token embeddings of the text encoder, not UNet "
                "weights: it has no UNet delta form"
            )
        scaling = self.lora_scaling
        tensors = {f"unet.{m}.weight": (b.float() @ a.float()) * scaling  # (out, in)
                   for m, (a, b) in self.lora_pairs().items()}
        tensors.update(self.row_tensors())
        meta = {**self.metadata, "converted_from": "lora"}
        return Patch("delta", tensors, meta, None, self.name)

    def row_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if is_row_key(k)}

    def check_family(self, pipe: Any) -> None:
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

def load_patch(path: str | Path) -> Patch:
    """Read a patch written by `Patch.save`."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise FmnError(f"{path} is a folder, not a patch file: pass the .safetensors file "
                       "`fmn forget` wrote")
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
    try:
        meta = json.loads(header[METADATA_KEY])
        kind = meta.pop("kind")
    except (ValueError, KeyError, AttributeError) as e:
        raise FmnError(f"{path} has damaged forget-me-not metadata ({e}): make it again") from e
    name = meta.pop("name", "fmn")
    version = meta.pop("format_version", None)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise FmnError(f"{path} is patch format {version}, newer than this forget-me-not reads "
                       f"({FORMAT_VERSION}): upgrade forget-me-not")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FmnError(f"{path} holds non-finite values (NaN or Inf) in {key}: the training "
                           "diverged; make the patch again with a lower --lr")
    lora_config = None
    if LORA_METADATA_KEY in header:
        packed = json.loads(header[LORA_METADATA_KEY])
        lora_config = {k.removeprefix("unet."): v for k, v in packed.items()
                       if k.startswith("unet.")}
    if kind not in KINDS:
        raise FmnError(f"{path} is damaged: unknown patch kind {kind!r}; make the patch again")
    patch = Patch(kind=kind, tensors=tensors, metadata=meta, lora_config=lora_config, name=name)
    patch.check_integrity()
    return patch


# -- strength, names ----------------------------------------------------------------------------


def check_strength(strength: float) -> float:
    """A patch strength: 0 (off) .. 1 (as trained) .. MAX_STRENGTH; anything else is refused."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise FmnError(f"patch strength must be a number, got {strength!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= MAX_STRENGTH):
        raise FmnError(
            f"patch strength {strength} is outside 0..{MAX_STRENGTH:g}: pass a value between "
            "0 (off) and 1 (as trained), or a little above 1 to strengthen it"
        )
    return value


def adapter_name(text: str) -> str:
    """peft adapter names become module keys: no dots, nothing exotic."""
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)[:96]


def same_family(patches: Sequence[Patch]) -> str | None:
    families = {p.family for p in patches if p.family}
    if len(families) > 1:
        named = ", ".join(f"{p.name} ({p.family})" for p in patches)
        raise FmnError(
            f"these patches are for different model families: {named}: stack patches made "
            "for the same model"
        )
    hashes = {p.metadata.get("base_model_hash") for p in patches} - {None}
    if len(hashes) > 1:
        warnings.warn("stacking patches trained on different base models (hashes differ)",
                      stacklevel=3)
    return families.pop() if families else None



def run_name(prefix: str, concepts: Any, metadata: dict[str, Any]) -> str:
    """A readable adapter name, unique per run so patches stack under their own names."""
    words = "_".join("".join(ch if ch.isalnum() else "_" for ch in c.words) for c in concepts)
    # the wall-clock time is not part of what was trained: the same run keeps its name
    identity = {k: v for k, v in metadata.items() if k != "seconds"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return f"{prefix}_{words[:48]}_{digest.hexdigest()[:8]}"
