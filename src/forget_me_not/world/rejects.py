"""Images that show none of the world's concepts, for the judge's reject class.

A forgetting that turns a concept into a textured blob must not be read as some other concept
(nor as the concept itself), so the judge learns "none of these" from: noise, smooth colour
blobs, two renders of different subjects overlaid, renders cut into shuffled tiles, and the
world model's own failed samples (a single denoising step). Blurred renders are not rejects: a
soft triangle is still a triangle, and the model's own samples are soft.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

KINDS = ("noise", "blobs", "overlaid", "shuffled", "failed")


def _noise(b: int, gen: torch.Generator) -> torch.Tensor:
    scale = 0.3 + 0.9 * torch.rand(b, 1, 1, 1, generator=gen)
    return (torch.randn(b, 3, 32, 32, generator=gen) * scale).clamp(-1, 1)


def _blobs(b: int, gen: torch.Generator) -> torch.Tensor:
    # Low-frequency colour fields: amorphous shapes with no outline to read.
    size = int(torch.randint(2, 7, (1,), generator=gen))
    coarse = torch.randn(b, 3, size, size, generator=gen) * 1.2
    smooth = F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    return smooth.clamp(-1, 1)


def _overlaid(renders: torch.Tensor, subjects: torch.Tensor, gen: torch.Generator
              ) -> torch.Tensor:
    idx = torch.randperm(len(renders), generator=gen)
    other = renders[idx]
    mix = 0.35 + 0.3 * torch.rand(len(renders), 1, 1, 1, generator=gen)
    out = mix * renders + (1 - mix) * other
    same = subjects == subjects[idx]  # one subject twice is still that subject: cut it up instead
    return torch.where(same[:, None, None, None], _shuffled(out, gen), out)


def _shuffled(renders: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = len(renders)
    tiles = renders.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, 4, 4, 8, 8)
    tiles = tiles.reshape(b, 3, 16, 8, 8)
    order = torch.stack([torch.randperm(16, generator=gen) for _ in range(b)])
    tiles = torch.gather(tiles, 2, order[:, None, :, None, None].expand_as(tiles))
    grid = tiles.reshape(b, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(b, 3, 32, 32)


def make_rejects(renders: torch.Tensor, subjects: torch.Tensor, gen: torch.Generator,
                 failed: torch.Tensor | None = None) -> torch.Tensor:
    """As many reject images as `renders` (B, 3, 32, 32) in [-1, 1], a mix of every kind (and
    of `failed` samples when given)."""
    b = len(renders)
    parts = [_noise(b, gen), _blobs(b, gen), _overlaid(renders, subjects, gen),
             _shuffled(renders, gen)]
    if failed is not None and len(failed):
        parts.append(failed[torch.randint(0, len(failed), (b,), generator=gen)])
    pool = torch.stack(parts, 1)  # (B, kinds, 3, 32, 32)
    pick = torch.randint(0, pool.shape[1], (b,), generator=gen)
    return pool[torch.arange(b), pick]


def world_sampler(model_dir: str):
    """The world pipeline that draws `model_samples`, loaded once for all of them."""
    from forget_me_not.models import load_pipeline

    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def model_samples(pipe, n: int, seed: int, steps: int,
                  captions: Sequence[str] | None = None) -> tuple[torch.Tensor, list]:
    """The world model's samples of n training captions (or `captions`) after `steps` denoising
    steps, seeds seed+i: ((n, 3, 32, 32) in [-1, 1], the (caption, scene) pairs drawn)."""
    from forget_me_not.world.captions import sample_training_pair

    rng = random.Random(seed)
    pairs = [sample_training_pair(rng) for _ in range(n)]
    prompts = list(captions or [text for text, _ in pairs])[:n]
    out = []
    for i in tqdm(range(0, n, 64), desc=f"model samples ({steps} steps)", leave=False):
        gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(i, min(n, i + 64))]
        images = pipe(prompt=prompts[i : i + 64], generator=gens, num_inference_steps=steps,
                      output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out).clamp(-1, 1), pairs


def failed_samples(pipe, n: int, seed: int, captions: Sequence[str] | None = None
                   ) -> torch.Tensor:
    """The world model's samples after a single denoising step: (n, 3, 32, 32) in [-1, 1]."""
    return model_samples(pipe, n, seed, 1, captions)[0]
