"""Placebo patches: a trained patch's size, in random directions.

A retention figure alone cannot tell whether a concept lost samples because the patch aimed
near it or because the model loses that concept under any change of that size. A placebo keeps
the size of every layer's change (a LoRA module's ||B A||, a full delta's norm per tensor, a
token row's norm) and draws its direction at random: scoring the model with it gives the
retention that the size of the change alone costs, and should leave the target drawn.
"""

from __future__ import annotations

import torch

from forget_me_not.errors import FmnError
from forget_me_not.patch import Patch


def placebo(patch: Patch, seed: int) -> Patch:
    """A patch of `patch`'s kind and per-layer size whose directions are seeded Gaussian draws."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    if patch.kind == "lora":
        tensors = _lora_like(patch.tensors, gen)
    elif patch.kind == "embedding":
        tensors = dict(patch.tensors)
        for key, value in sorted(patch.tensors.items()):
            if key.endswith(".token_delta"):
                tensors[key] = _random_rows(value, gen)
    else:
        tensors = {key: _random_like(value, gen) for key, value in sorted(patch.tensors.items())}
    meta = {**patch.metadata, "placebo_of": patch.name, "placebo_seed": int(seed)}
    return Patch(patch.kind, tensors, meta, patch.lora_config, f"{patch.name}_placebo{seed}")


def _lora_like(tensors: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random A and B per module, scaled so that ||B' A'|| equals the trained ||B A||."""
    out: dict[str, torch.Tensor] = {}
    for key, a in sorted(tensors.items()):  # key order fixes the draws, however the file lists them
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise FmnError(f"LoRA patch holds {key} without its {b_key}: make the patch again")
        b = tensors[b_key]
        ra = torch.randn(a.shape, generator=gen)
        rb = torch.randn(b.shape, generator=gen)
        trained = float((b.float() @ a.float()).norm())
        drawn = float((rb @ ra).norm()) or 1.0
        # Split the factor evenly between A and B so neither is far from its usual scale.
        factor = (trained / drawn) ** 0.5
        out[key] = (ra * factor).to(a.dtype)
        out[b_key] = (rb * factor).to(b.dtype)
    leftover = [k for k in tensors if k not in out]
    if leftover:
        raise FmnError(f"LoRA patch holds tensors that are no LoRA factor: {leftover[:3]}")
    return out


def _random_like(value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    drawn = torch.randn(value.shape, generator=gen)
    norm = float(drawn.norm()) or 1.0
    return (drawn * (float(value.float().norm()) / norm)).to(value.dtype)


def _random_rows(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    drawn = torch.randn(rows.shape, generator=gen)
    norms = rows.float().norm(dim=-1, keepdim=True)
    return (drawn / drawn.norm(dim=-1, keepdim=True).clamp(min=1e-12) * norms).to(rows.dtype)
