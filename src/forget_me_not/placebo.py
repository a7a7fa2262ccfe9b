"""Placebo patches: a trained patch's size, in random directions.

A retention figure alone cannot tell whether a concept lost samples because the patch aimed
near it or because the model loses that concept under any change of that size. A placebo keeps
the size of every layer's change (a LoRA module's ||B A||, a full delta's norm per tensor, a
token row's norm) and draws its direction at random: scoring the model with it gives the
retention that the size of the change alone costs, and should leave the target drawn.
"""

from __future__ import annotations

import torch

from forget_me_not.patch import Patch, adapter_name


def placebo(patch: Patch, seed: int) -> Patch:
    """A patch of `patch`'s kind and per-layer size whose directions are seeded Gaussian draws."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    # Sorted names fix the order of the draws, however the file lists the tensors.
    tensors = dict(patch.tensors)
    if patch.kind == "lora":
        for module, (a, b) in sorted(patch.lora_pairs().items()):
            ra, rb = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
            trained = float((b.float() @ a.float()).norm())
            drawn = float((rb @ ra).norm()) or 1.0
            # Split the factor evenly between A and B so neither is far from its usual scale.
            factor = (trained / drawn) ** 0.5
            tensors[f"unet.{module}.lora_A.weight"] = (ra * factor).to(a.dtype)
            tensors[f"unet.{module}.lora_B.weight"] = (rb * factor).to(b.dtype)
    elif patch.kind == "delta":
        for key, value in sorted(patch.unet_tensors.items()):
            tensors[key] = _same_norms(value, gen)
    if patch.has_rows or patch.kind == "embedding":
        for encoder, (_, rows) in sorted(patch.token_rows().items()):
            tensors[f"{encoder}.token_delta"] = _same_norms(rows, gen, dim=-1)
    meta = {**patch.metadata, "placebo_of": patch.name, "placebo_seed": int(seed)}
    return Patch(patch.kind, tensors, meta, patch.lora_config,
                 adapter_name(f"{patch.name}_placebo{seed}"))


def _same_norms(value: torch.Tensor, gen: torch.Generator, dim: int | None = None) -> torch.Tensor:
    """A Gaussian draw of `value`'s shape with its norm (over `dim`, or over the whole)."""
    drawn = torch.randn(value.shape, generator=gen)
    dims = None if dim is None else (dim,)
    target = value.float().norm(dim=dims, keepdim=True)
    return (drawn / drawn.norm(dim=dims, keepdim=True).clamp(min=1e-12) * target).to(value.dtype)
