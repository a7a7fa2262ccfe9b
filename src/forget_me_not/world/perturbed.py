"""Randomly perturbed copies of a pipeline, whose good samples teach the judge's reject head.

A reject head taught only one model's good samples as kept learns that model's look: an edited
model's well-drawn samples (a forgetting's, or a random change of its size) then read as
failures, and retention counts them lost. Samples from copies of the model whose cross-attention
projections carry a random change, kept where the judge's other heads read them as their caption
asks, teach the reject head to judge the image and not which weights drew it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The projections a text-conditioned edit changes (FMN, UCE, ESD-x and their LoRA all live here).
CROSS_ATTENTION = ("attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
                   "attn2.to_out.0.weight")


@contextmanager
def perturbed(unet: torch.nn.Module, scale: float, seed: int) -> Iterator[int]:
    """Within the block, each cross-attention projection W of `unet` is W + D, D a seeded
    Gaussian direction with ||D|| = scale * ||W||; restored on exit. Yields the number changed."""
    if scale < 0:
        raise ValueError(f"scale must be 0 or more, got {scale}")
    gen = torch.Generator("cpu").manual_seed(int(seed))
    saved: dict[str, torch.Tensor] = {}
    params = dict(unet.named_parameters())
    try:
        # Sorted names fix the order of the draws, whatever order the model lists them in.
        for name in sorted(n for n in params if n.endswith(CROSS_ATTENTION)):
            weight = params[name]
            saved[name] = weight.detach().clone()
            direction = torch.randn(weight.shape, generator=gen)
            change = direction / direction.norm().clamp(min=1e-12) * scale * weight.float().norm()
            with torch.no_grad():
                weight.add_(change.to(weight.device, weight.dtype))
        yield len(saved)
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)


def scales(largest: float, models: int) -> list[float]:
    """Evenly spaced change sizes up to `largest`, one per perturbed model: edits of every size
    a forgetting makes, not one."""
    return [largest * (m + 1) / models for m in range(models)]
