"""A fixed pool of rendered training pairs, regenerated identically from a seed (so resuming a
run sees the same data) instead of rendering on every step, which would compete with training
for the CPU."""

from __future__ import annotations

import random

import numpy as np
import torch
from tqdm import tqdm

from forget_me_not.errors import FmnError
from forget_me_not.world.captions import sample_training_pair
from forget_me_not.world.render import Scene, render

# Draws tried in a row before a leave-out is taken to leave nothing (one in 1,000 or fewer).
MAX_REDRAWS = 1000


def shows_any(text: str, scene: Scene, words: frozenset[str]) -> bool:
    """Whether a training pair names or shows any of `words` (subject, style or colour)."""
    return bool(words) and (bool(words & set(text.lower().split()))
                            or bool(words & {scene.subject, scene.style, scene.colour}))


def render_pool(n: int, seed: int, progress: bool = True,
                leave_out: frozenset[str] = frozenset()) -> tuple[list[str], torch.Tensor]:
    """`n` (caption, image) pairs; images as a uint8 tensor (n, 3, H, W).

    `leave_out`: no pair names or shows these concepts (a model that never saw them), each
    such draw replaced by the next.
    """
    rng = random.Random(seed)
    captions: list[str] = []
    images = []
    for _ in tqdm(range(n), desc="rendering pool", disable=not progress, leave=False):
        text, scene = sample_training_pair(rng)
        for _ in range(MAX_REDRAWS):
            if not shows_any(text, scene, leave_out):
                break
            text, scene = sample_training_pair(rng)
        else:
            raise FmnError(f"leaving out {', '.join(sorted(leave_out))} leaves almost nothing "
                           "to train on: leave out fewer concepts")
        captions.append(text)
        images.append(np.asarray(render(scene)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)
    return captions, pixels


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], as diffusers' VAEs expect."""
    return pixels.float().div(127.5).sub(1.0)
