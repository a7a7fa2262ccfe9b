"""Operations on patches: stack, unstack, extract a LoRA from a delta, merge into the weights."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.files import probe_writable, publish
from forget_me_not.patch.applying import add_rows, applied_registry, check_fit, unet_param
from forget_me_not.patch.core import (
    Patch,
    adapter_name,
    check_strength,
    library_versions,
    same_family,
)

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
    names = [p.name for p in patches]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise FmnError(f"patch {twice!r} is given twice: a patch goes on once, in a stack as on a "
                       "pipeline; to strengthen it, give it a strength (e.g. 2) instead")
    strengths = [check_strength(s) for s in (strengths or [1.0] * len(patches))]
    if len(strengths) != len(patches):
        raise FmnError(f"got {len(strengths)} strengths for {len(patches)} patches")
    family = same_family(patches)
    concepts = [c for p in patches for c in p.metadata.get("concepts", [])]
    meta = {
        "method": "forget-me-not/stack",
        "concepts": concepts,
        "family": family,
        "base_model_hash": patches[0].metadata.get("base_model_hash"),
        "versions": library_versions(),
    }
    name = adapter_name(name or "fmn_stack_" + "_".join(p.name.removeprefix("fmn_")[:24]
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
    return Patch("lora", tensors, meta, config, adapter_name(f"{patch.name}_minus"))


# -- low-rank extraction ------------------------------------------------------------------------


def extract_lora(patch: Patch, rank: int, targets: Sequence[str] | None = None,
                 convolutions: bool = False) -> Patch:
    """A delta patch turned into a LoRA of `rank` by truncated SVD of each 2-D weight delta.

    Each linear weight delta D (out, in) becomes B @ A with B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.
    `convolutions`: a conv weight delta D (out, in, kh, kw) is carried too, as peft's conv
    LoRA (A a kh x kw conv to the rank, B a 1x1 conv back) from the SVD of D flattened to
    (out, in*kh*kw); off by default, as not every LoRA consumer reads conv LoRAs. Tensors a
    LoRA cannot carry (biases, norms, convolutions unless asked) are dropped. The relative Frobenius
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
        carried = d.ndim == 2 or (convolutions and d.ndim == 4)
        if not carried or not key.endswith(".weight") or not selected:
            dropped.append(key.removeprefix("unet."))
            err_sq += norm_sq
            continue
        shape = d.shape
        d = d.flatten(1)  # a conv's (out, in, kh, kw) as (out, in*kh*kw); a linear's unchanged
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
        if len(shape) == 4:  # peft's conv LoRA: A keeps the kernel, B is 1x1
            a, b = a.reshape(rank, *shape[1:]), b[:, :, None, None]
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
    return Patch("lora", {**tensors, **patch.row_tensors()}, meta, config,
                 adapter_name(f"{patch.name}_r{rank}"))


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
    if applied_registry(unet) or getattr(unet, "_hf_peft_config_loaded", False):
        raise FmnError("this pipeline has patches or adapters applied: merge into a clean model")
    for patch, s in zip(patches, strengths, strict=True):
        patch.check_family(pipe)
        tables = check_fit(pipe, patch) if patch.has_rows else {}
        if patch.kind != "embedding":
            delta = patch.to_delta().unet_tensors
            params = {k: unet_param(unet, k.removeprefix("unet.")) for k in delta}
            for key, p in params.items():
                if tuple(p.shape) != tuple(delta[key].shape):
                    raise FmnError(f"patch {patch.name!r} does not fit this UNet at {key}: "
                                   "apply it to the model it was made for")
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_((p.detach().float() + delta[key].to(p.device).float() * s).to(p.dtype))
        if tables:
            add_rows(tables, patch, s)


def save_merged(pipe: Any, patches: Sequence[Patch], out_dir: str | Path,
                source_dir: str | Path | None = None) -> Path:
    """save_pretrained the (merged) pipeline into `out_dir`, atomically, with a record."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FmnError(f"{out_dir} already exists: pick a new folder for the merged pipeline")
    if not out_dir.parent.is_dir():
        raise FmnError(f"folder {out_dir.parent} does not exist: create it first")
    probe_writable(out_dir.parent)
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
        publish(tmp, out_dir, folder=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

