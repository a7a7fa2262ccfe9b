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
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError

METADATA_KEY = "forget_me_not"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers reads the LoraConfig from here
FORMAT_VERSION = 1
KINDS = ("lora", "delta", "embedding")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # where an embedding patch's rows live
MAX_STRENGTH = 4.0  # beyond this a patch's delta dominates the model: almost surely a typo
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
        bad = [k for k in self.tensors if not k.startswith("unet.") and not _is_row_key(k)]
        if bad:
            raise FmnError(f"patch tensor names must start with 'unet.': {bad[:3]}")

    @property
    def family(self) -> str | None:
        return self.metadata.get("family")

    @property
    def has_rows(self) -> bool:
        """Whether the patch changes token-embedding rows (all an embedding patch does)."""
        return any(_is_row_key(k) for k in self.tensors)

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
        scale = check_strength(scale)
        self._check_family(pipe)
        unet = pipe.unet
        registry = _registry(unet)
        if self.name in registry:
            raise FmnError(
                f"patch {self.name!r} is already applied to this pipeline: remove it first, "
                "or give the second copy another name"
            )
        # Rows are checked before the UNet changes: a misfit changes nothing.
        tables = _check_fit(pipe, self) if self.has_rows else {}
        if self.kind == "lora":
            self._apply_lora(unet, scale)
        elif self.kind == "delta":
            self._apply_delta(unet, scale)
        else:
            registry[self.name] = {"kind": "embedding", "scale": float(scale)}
        if self.has_rows:
            registry[self.name].update({
                "row_stash": _add_rows(tables, self, scale),
                "patch_ids": {enc: ids for enc, (ids, _) in self.token_rows().items()},
            })

    def remove(self, pipe: Any) -> None:
        """Take the patch off again; the base model's outputs come back exactly."""
        unet = pipe.unet
        registry = _registry(unet)
        if self.name not in registry:
            raise FmnError(f"patch {self.name!r} is not applied to this pipeline")
        if self.has_rows:
            self._remove_rows(pipe)
        if self.kind == "lora":
            self._remove_lora(unet)
        elif self.kind == "delta":
            self._remove_delta(unet)
        else:
            registry.pop(self.name)

    def is_applied(self, pipe: Any) -> bool:
        return self.name in _registry(pipe.unet)

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
            if not _is_row_key(key):
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
            if _is_row_key(key):
                return key.endswith(".token_delta")
            return self.kind == "delta" or ".lora_B." in key

        tensors = {k: (v * strength if scales(k) else v.clone()) for k, v in self.tensors.items()}
        meta = {**self.metadata, "strength": float(self.metadata.get("strength", 1.0)) * strength}
        return Patch(self.kind, tensors, meta, dict(self.lora_config or {}) or None,
                     _adapter_name(f"{self.name}_x{strength:g}"))

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
        tensors.update(self._row_tensors())
        meta = {**self.metadata, "converted_from": "lora"}
        return Patch("delta", tensors, meta, None, self.name)

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if _is_row_key(k)}

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
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter is added: stacking is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(LoraConfig(**self.lora_config), adapter_name=self.name)
        except ValueError as e:  # peft: no module matches the targets
            raise FmnError(
                f"patch {self.name!r} targets modules this UNet does not have ({e}): apply it "
                "to the model it was made for"
            ) from e
        state = {k.removeprefix("unet."): v for k, v in self.tensors.items()}
        try:
            result = set_peft_model_state_dict(unet, state, adapter_name=self.name)
        except RuntimeError as e:  # shape mismatch: made for other layer sizes
            _drop_adapter(unet, self.name, before)
            first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
            raise FmnError(
                f"patch {self.name!r} does not fit this UNet ({first[:160]}): apply it to the "
                "model it was made for"
            ) from e
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            _drop_adapter(unet, self.name, before)
            raise FmnError(
                f"patch {self.name!r} does not fit this UNet ({len(unexpected)} unknown "
                f"weights, e.g. {unexpected[0]}): apply it to the model it was made for"
            )
        _registry(unet)[self.name] = {"kind": "lora", "scale": float(scale)}
        _activate(unet, before)

    def _remove_lora(self, unet: Any) -> None:
        before = [n for n in _active_adapters(unet) if n != self.name]
        _registry(unet).pop(self.name)
        _drop_adapter(unet, self.name, before)

    def _apply_delta(self, unet: Any, scale: float) -> None:
        stash: dict[str, torch.Tensor] = {}
        params = [(_param(unet, k.removeprefix("unet.")), k) for k in self.unet_tensors]
        for p, key in params:
            if tuple(p.shape) != tuple(self.tensors[key].shape):
                raise FmnError(
                    f"patch {self.name!r} does not fit this UNet ({key}: patch "
                    f"{tuple(self.tensors[key].shape)}, model {tuple(p.shape)}): apply it to the "
                    "model it was made for"
                )
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

    def _remove_rows(self, pipe: Any) -> None:
        """Put the token rows back (the registry entry stays: the UNet half comes off next)."""
        registry = _registry(pipe.unet)
        names = list(registry)
        later = [registry[n] for n in names[names.index(self.name) + 1 :]
                 if "patch_ids" in registry[n]]
        entry = registry[self.name]
        with torch.no_grad():
            for enc, (ids, delta) in self.token_rows().items():
                table = _token_table(pipe, enc, self.name)
                index = ids.to(table.device)
                shared = [e for e in later if enc in e["patch_ids"]
                          and bool(torch.isin(ids, e["patch_ids"][enc]).any())]
                if not shared:
                    table[index] = entry["row_stash"][enc].to(table.device)  # exact
                    continue
                # A later patch changed some of the same rows: take ours out
                # arithmetically and fix what that patch will restore.
                change = delta.float() * entry["scale"]
                table[index] = (table[index].float() - change.to(table.device)).to(table.dtype)
                for e in shared:
                    their = e["patch_ids"][enc]
                    for row, token in enumerate(ids.tolist()):
                        hit = (their == token).nonzero().flatten()
                        if hit.numel():
                            old = e["row_stash"][enc][hit[0]]
                            e["row_stash"][enc][hit[0]] = (old.float() - change[row]).to(
                                old.dtype)


def _is_row_key(key: str) -> bool:
    encoder, _, leaf = key.partition(".")
    return encoder in TEXT_ENCODERS and leaf in ("token_ids", "token_delta")


def _token_table(pipe: Any, encoder: str, patch_name: str) -> torch.Tensor:
    """The token-embedding weight (vocab, dim) of the pipeline's `encoder`."""
    module = getattr(pipe, encoder, None)
    if module is None:
        raise FmnError(
            f"patch {patch_name!r} changes {encoder}, which this pipeline does not have: apply "
            "it to the model it was made for"
        )
    return module.get_input_embeddings().weight


def _add_rows(tables: dict[str, torch.Tensor], patch: Patch,
              strength: float) -> dict[str, torch.Tensor]:
    """Add the patch's row deltas to the token tables `_check_fit` returned for it; returns the
    rows as they were, per encoder."""
    rows = patch.token_rows()
    before: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for enc, (ids, delta) in rows.items():
            table, index = tables[enc], ids.to(tables[enc].device)
            before[enc] = table[index].detach().to("cpu", copy=True)
            moved = table[index].float() + delta.to(table.device, torch.float32) * strength
            table[index] = moved.to(table.dtype)
    return before


def _check_fit(pipe: Any, patch: Patch) -> dict[str, torch.Tensor]:
    """The token tables the patch's rows go into, once each row is checked to fit."""
    rows = patch.token_rows()
    tables = {enc: _token_table(pipe, enc, patch.name) for enc in rows}
    for enc, (ids, delta) in rows.items():
        _check_rows(tables[enc], ids, delta, enc, patch.name)
    return tables


def _check_rows(table: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor, encoder: str,
                patch_name: str) -> None:
    if ids.unique().numel() != ids.numel():
        raise FmnError(f"patch {patch_name!r} is damaged: {encoder} lists a token twice; make "
                       "it again")
    if delta.shape[1] != table.shape[1] or int(ids.max()) >= table.shape[0] or int(ids.min()) < 0:
        raise FmnError(
            f"patch {patch_name!r} does not fit this {encoder} (rows of width {delta.shape[1]} "
            f"for tokens up to {int(ids.max())}; the model has {table.shape[0]} tokens of width "
            f"{table.shape[1]}): apply it to the model it was made for"
        )


def _registry(unet: Any) -> dict[str, dict[str, Any]]:
    registry = getattr(unet, _REGISTRY_ATTR, None)
    if registry is None:
        registry = {}
        object.__setattr__(unet, _REGISTRY_ATTR, registry)
    return registry


def _drop_adapter(unet: Any, name: str, active: list[str]) -> None:
    """Delete adapter `name`; unwrap the peft layers when none is left, else reactivate."""
    unet.delete_adapters(name)
    if not getattr(unet, "peft_config", None):
        # No adapter left: unwrap the peft layers so the UNet is the base model again.
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(unet)
        unet._hf_peft_config_loaded = None
    else:
        _activate(unet, [n for n in active if n != name])


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
    try:
        meta = json.loads(header[METADATA_KEY])
        kind = meta.pop("kind")
    except (ValueError, KeyError, AttributeError) as e:
        raise FmnError(f"{path} has damaged forget-me-not metadata ({e}): make it again") from e
    name = meta.pop("name", "fmn")
    meta.pop("format_version", None)
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


def _adapter_name(text: str) -> str:
    """peft adapter names become module keys: no dots, nothing exotic."""
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)[:96]


def _same_family(patches: Sequence[Patch]) -> str | None:
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


# -- stacking -----------------------------------------------------------------------------------


def stack_patches(patches: Sequence[Patch], strengths: Sequence[float] | None = None,
                  name: str | None = None) -> Patch:
    """Several patches as one, with the same effect as applying them all.

    LoRAs are stacked exactly by rank concatenation: for each module, A = [A1; A2; ...] and
    B = [s1·B1, s2·B2, ...] (s_i = strength_i · alpha_i / r_i, alpha = total rank so peft's
    scaling is 1), zero blocks where a patch does not touch the module. Ranks may differ.
    Each part's rank slice is recorded under "parts", so `unstack` can take one out again.
    When any patch is a delta patch, everything is summed as full-weight deltas. Token rows
    (of embedding patches, or beside a LoRA or delta) are summed per token.
    """
    patches = list(patches)
    if len(patches) < 2:
        raise FmnError("stacking needs at least two patches")
    strengths = [check_strength(s) for s in (strengths or [1.0] * len(patches))]
    if len(strengths) != len(patches):
        raise FmnError(f"got {len(strengths)} strengths for {len(patches)} patches")
    family = _same_family(patches)
    concepts = [c for p in patches for c in p.metadata.get("concepts", [])]
    meta = {
        "method": "forget-me-not/stack",
        "concepts": concepts,
        "family": family,
        "base_model_hash": patches[0].metadata.get("base_model_hash"),
        "versions": library_versions(),
    }
    name = _adapter_name(name or "fmn_stack_" + "_".join(p.name.removeprefix("fmn_")[:24]
                                                         for p in patches))
    scaled_parts = [{**part, "strength": part.get("strength", 1.0) * s}
                    for p, s in zip(patches, strengths, strict=True)
                    for part in p.metadata.get("parts") or [_as_part(p)]]
    with_rows = [(p, s) for p, s in zip(patches, strengths, strict=True) if p.has_rows
                 or p.kind == "embedding"]
    rows = _summed_rows(*zip(*with_rows, strict=True)) if with_rows else {}
    unet_side = [(p, s) for p, s in zip(patches, strengths, strict=True) if p.kind != "embedding"]
    if not unet_side:
        return Patch("embedding", rows, {**meta, "parts": scaled_parts}, None, name)
    if any(p.kind == "delta" for p, _ in unet_side):
        total: dict[str, torch.Tensor] = {}
        for p, s in unet_side:
            for k, v in p.to_delta().unet_tensors.items():
                total[k] = total.get(k, 0) + v.float() * s
        for part in scaled_parts:
            part.pop("rank_slice", None)  # summed deltas have no separable parts
        return Patch("delta", {**total, **rows}, {**meta, "parts": scaled_parts}, None, name)

    patches, strengths = [p for p, _ in unet_side], [s for _, s in unet_side]
    pairs = [p.lora_pairs() for p in patches]
    ranks = [p.rank for p in patches]
    modules = sorted(set().union(*pairs))
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        a_blocks, b_blocks = [], []
        shape = next((pp[m][0].shape[1], pp[m][1].shape[0]) for pp in pairs if m in pp)
        for pp, p, r, s in zip(pairs, patches, ranks, strengths, strict=True):
            if m in pp:
                a, b = pp[m]
                if (a.shape[1], b.shape[0]) != shape:
                    raise FmnError(f"patches disagree on the shape of {m}: made for other models")
                a_blocks.append(a.float())
                b_blocks.append(b.float() * (s * p.lora_scaling))
            else:
                a_blocks.append(torch.zeros(r, shape[0]))
                b_blocks.append(torch.zeros(shape[1], r))
        tensors[f"unet.{m}.lora_A.weight"] = torch.cat(a_blocks, dim=0)  # (R, in)
        tensors[f"unet.{m}.lora_B.weight"] = torch.cat(b_blocks, dim=1)  # (out, R)
    total_rank = sum(ranks)
    # Rank slices: each input patch occupies its own block, parts of a stacked input inside it.
    # Token-row parts (summed above) keep no slice.
    offset = 0
    parts = [part for part in scaled_parts if part["kind"] == "embedding"]
    for p, s in zip(patches, strengths, strict=True):
        for part in p.metadata.get("parts") or [_as_part(p)]:
            lo, hi = part["rank_slice"]
            parts.append({**part, "strength": part.get("strength", 1.0) * s,
                          "rank_slice": [offset + lo, offset + hi]})
        offset += p.rank
    targets = sorted(set().union(*[p.lora_config["target_modules"] for p in patches]))
    config = {"r": total_rank, "lora_alpha": total_rank, "target_modules": targets,
              "init_lora_weights": True}
    return Patch("lora", {**tensors, **rows}, {**meta, "parts": parts}, config, name)


def _summed_rows(patches: Sequence[Patch], strengths: Sequence[float]) -> dict[str, torch.Tensor]:
    """Embedding patches as one: the union of their tokens, each token's deltas summed."""
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for p, s in zip(patches, strengths, strict=True):
        for enc, (ids, delta) in p.token_rows().items():
            mine = rows.setdefault(enc, {})
            for token, row in zip(ids.tolist(), delta.float(), strict=True):
                mine[token] = mine.get(token, 0) + row * s
    tensors: dict[str, torch.Tensor] = {}
    for enc, mine in rows.items():
        tokens = sorted(mine)
        tensors[f"{enc}.token_ids"] = torch.tensor(tokens, dtype=torch.int64)
        tensors[f"{enc}.token_delta"] = torch.stack([mine[t] for t in tokens])
    return tensors


def _as_part(patch: Patch) -> dict[str, Any]:
    """How a single patch is recorded inside a stack."""
    part = {
        "name": patch.name,
        "kind": patch.kind,
        "concepts": [c.get("name") for c in patch.metadata.get("concepts", [])],
        "strength": float(patch.metadata.get("strength", 1.0)),
        "settings": patch.metadata.get("settings"),
    }
    if patch.kind == "lora":
        part["rank_slice"] = [0, patch.rank]
    return part


def unstack(patch: Patch, drop: Sequence[str]) -> Patch:
    """The stacked LoRA `patch` without the parts named in `drop` (part names or concepts).

    Exact: each part owns a slice of the rank, so dropping it removes precisely its term.
    """
    parts = patch.metadata.get("parts")
    if patch.has_rows:
        raise FmnError(
            f"patch {patch.name!r} carries token rows, summed over its parts, so no part can be "
            "taken out of it: stack the patches you want to keep again"
        )
    if patch.kind != "lora" or not parts or any("rank_slice" not in p for p in parts):
        raise FmnError(
            f"patch {patch.name!r} is not a stack of LoRA patches (`fmn patch stack`): a part "
            "can only be taken out of such a stack; otherwise just stop applying the patch"
        )
    wanted = set(drop)
    gone = [p for p in parts if p["name"] in wanted or wanted & set(p["concepts"])]
    if not gone:
        known = ", ".join(f"{p['name']} ({', '.join(p['concepts'])})" for p in parts)
        raise FmnError(f"no part of this stack matches {sorted(wanted)}: its parts are {known}")
    kept = [p for p in parts if p not in gone]
    if not kept:
        raise FmnError("that would remove every part of the stack: delete the file instead")
    index = torch.cat([torch.arange(*p["rank_slice"]) for p in kept])  # kept rank rows
    tensors = {}
    for key, value in patch.tensors.items():
        # Stored B already carries strength * alpha / r of each part, so slicing is exact.
        tensors[key] = value[index] if ".lora_A." in key else value[:, index]
    offset, new_parts = 0, []
    for p in kept:
        lo, hi = p["rank_slice"]
        new_parts.append({**p, "rank_slice": [offset, offset + hi - lo]})
        offset += hi - lo
    scaling = patch.lora_scaling  # keep the stored products exact: alpha/r stays as it was
    config = {**patch.lora_config, "r": offset, "lora_alpha": scaling * offset}
    names = {c for p in gone for c in p["concepts"]}
    concepts = [c for c in patch.metadata.get("concepts", []) if c.get("name") not in names]
    meta = {**patch.metadata, "parts": new_parts, "concepts": concepts}
    return Patch("lora", tensors, meta, config, _adapter_name(f"{patch.name}_minus"))


# -- low-rank extraction ------------------------------------------------------------------------


def extract_lora(patch: Patch, rank: int, targets: Sequence[str] | None = None) -> Patch:
    """A delta patch turned into a LoRA of `rank` by truncated SVD of each 2-D weight delta.

    Each linear weight delta D (out, in) becomes B @ A with B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.
    Tensors a LoRA cannot carry (biases, norms, convolutions) are dropped. The relative Frobenius
    error ||D - B A|| / ||D|| per layer, and overall (dropped tensors counted in full), is stored
    under metadata["extraction"].
    """
    if patch.kind == "embedding":
        raise FmnError(f"patch {patch.name!r} changes token embeddings, not UNet weights: it "
                       "has no LoRA form; ship it as it is")
    if patch.kind != "delta":
        raise FmnError(f"patch {patch.name!r} is already a LoRA: extraction needs a delta patch")
    if int(rank) < 1:
        raise FmnError(f"--rank must be a positive integer, got {rank}")
    rank = int(rank)
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, float] = {}
    dropped: list[str] = []
    err_sq = total_sq = 0.0
    for key, delta in sorted(patch.unet_tensors.items()):
        d = delta.float()
        norm_sq = float(d.pow(2).sum())
        total_sq += norm_sq
        module = key.removeprefix("unet.").removesuffix(".weight")
        selected = targets is None or any(module.endswith(t) for t in targets)
        if d.ndim != 2 or not key.endswith(".weight") or not selected:
            dropped.append(key.removeprefix("unet."))
            err_sq += norm_sq
            continue
        u, s, vh = torch.linalg.svd(d, full_matrices=False)  # (out, k), (k,), (k, in)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = u[:, :k] * root  # (out, k)
        a = root[:, None] * vh[:k]  # (k, in)
        if k < rank:  # a thin layer: pad with zero directions so every module has one rank
            a = torch.cat([a, torch.zeros(rank - k, a.shape[1])])
            b = torch.cat([b, torch.zeros(b.shape[0], rank - k)], dim=1)
        residual = float((d - b @ a).pow(2).sum())
        err_sq += residual
        per_layer[module] = math.sqrt(residual / norm_sq) if norm_sq > 0 else 0.0
        tensors[f"unet.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise FmnError(
            f"patch {patch.name!r} has no 2-D weight a LoRA can carry (only {len(dropped)} "
            "biases/norms/convolutions): ship it as it is"
        )
    overall = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    extraction = {"rank": rank, "overall_relative_error": overall,
                  "per_layer_relative_error": per_layer, "dropped": dropped}
    config = {"r": rank, "lora_alpha": rank,
              "target_modules": sorted(k.removeprefix("unet.").removesuffix(".lora_A.weight")
                                       for k in tensors if ".lora_A." in k),
              "init_lora_weights": True}
    meta = {**patch.metadata, "extraction": extraction, "extracted_from": "delta"}
    return Patch("lora", {**tensors, **patch._row_tensors()}, meta, config,
                 _adapter_name(f"{patch.name}_r{rank}"))


# -- merging into the weights -------------------------------------------------------------------


def merge_into(pipe: Any, patches: Sequence[Patch],
               strengths: Sequence[float] | None = None) -> None:
    """Fuse `patches` into `pipe`'s weights for good (for saving a full pipeline): UNet
    deltas and LoRAs into the UNet, embedding patches into the token-embedding table(s).

    The pipeline must carry no applied patch (fuse the files, not live adapters).
    """
    strengths = [check_strength(s) for s in (strengths or [1.0] * len(patches))]
    if len(strengths) != len(patches):
        raise FmnError(f"got {len(strengths)} strengths for {len(patches)} patches")
    unet = pipe.unet
    if _registry(unet) or getattr(unet, "_hf_peft_config_loaded", False):
        raise FmnError("this pipeline has patches or adapters applied: merge into a clean model")
    for patch, s in zip(patches, strengths, strict=True):
        patch._check_family(pipe)
        tables = _check_fit(pipe, patch) if patch.has_rows else {}
        if patch.kind != "embedding":
            delta = patch.to_delta().unet_tensors
            params = {k: _param(unet, k.removeprefix("unet.")) for k in delta}
            for key, p in params.items():
                if tuple(p.shape) != tuple(delta[key].shape):
                    raise FmnError(f"patch {patch.name!r} does not fit this UNet at {key}: "
                                   "apply it to the model it was made for")
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_((p.detach().float() + delta[key].to(p.device).float() * s).to(p.dtype))
        if tables:
            _add_rows(tables, patch, s)


def save_merged(pipe: Any, patches: Sequence[Patch], out_dir: str | Path,
                source_dir: str | Path | None = None) -> Path:
    """save_pretrained the (merged) pipeline into `out_dir`, atomically, with a record."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FmnError(f"{out_dir} already exists: pick a new folder for the merged pipeline")
    if not out_dir.parent.is_dir():
        raise FmnError(f"folder {out_dir.parent} does not exist: create it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if source_dir is not None:
            from forget_me_not.models import WORLD_MARKER

            marker = Path(source_dir) / WORLD_MARKER
            if marker.is_file():  # keeps the merged ConceptWorld model in its family
                shutil.copy2(marker, tmp / WORLD_MARKER)
        record = {"merged_patches": [{"name": p.name, "kind": p.kind,
                                      "concepts": p.metadata.get("concepts", []),
                                      "family": p.family} for p in patches],
                  "versions": library_versions()}
        (tmp / "forget_me_not_merge.json").write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        "train": patch.metadata.get("train"),
        "steps": patch.metadata.get("steps"),
        "seed": patch.metadata.get("seed"),
        "settings": patch.metadata.get("settings"),
        "versions": patch.metadata.get("versions"),
    }
    if patch.has_rows and patch.kind != "embedding":
        info["token_rows"] = {enc: int(ids.numel()) for enc, (ids, _) in patch.token_rows().items()}
    for key in ("parts", "extraction", "correction", "preset", "tokens", "lora_strength"):
        if key in patch.metadata:
            info[key] = patch.metadata[key]
    if "placebo_of" in patch.metadata:
        info["placebo"] = {"of": patch.metadata["placebo_of"],
                           "seed": patch.metadata.get("placebo_seed")}
    return info
