"""Where each re-steering step's clean latent comes from: reference images, the model's own
drawings, or a zero latent (the official code's `no_real_image`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from forget_me_not.concepts import Concept
from forget_me_not.data import load_images, resize_random_crop
from forget_me_not.errors import FmnError
from forget_me_not.pipeline_io import draw_latents, encode_images


class References:
    """Per concept: PIL images ("images") or a pool of latents ("self", "noise")."""

    def __init__(self, pipe: Any, resolution: int, images: dict[int, list[Any]],
                 latents: dict[int, torch.Tensor]) -> None:
        self.pipe = pipe
        self.resolution = resolution
        self.images = images  # concept -> PIL images
        self.latents = latents  # concept -> (N, C, h, w)

    def sample(self, concept: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One clean latent (1, C, h, w) for `concept`, and its pixel weights (1, 1, H, W).

        The weights come from a reference image's alpha channel (None: every pixel counts).
        """
        if concept in self.latents:
            pool = self.latents[concept]
            i = int(torch.randint(0, pool.shape[0], (1,), generator=gen))
            return pool[i : i + 1], None
        pool = self.images[concept]
        i = int(torch.randint(0, len(pool), (1,), generator=gen))
        pixels = resize_random_crop(pool[i], self.resolution, gen)[None]  # (1, 3 or 4, H, W)
        weights = (pixels[:, 3:] + 1.0) / 2.0 if pixels.shape[1] == 4 else None
        return encode_images(self.pipe, pixels[:, :3], gen), weights


def build_references(pipe: Any, concepts: Sequence[Concept], reference: str, resolution: int,
                     n_self_images: int, self_steps: int, seed: int) -> References:
    images: dict[int, list[Any]] = {}
    latents: dict[int, torch.Tensor] = {}
    channels = pipe.unet.config.in_channels
    side = resolution // int(getattr(pipe, "vae_scale_factor", 8))
    for ci, concept in enumerate(concepts):
        if reference == "noise":
            # "No real image": the clean latent is zero, so the UNet sees pure noise.
            latents[ci] = torch.zeros(1, channels, side, side)
        elif reference == "self":
            prompts = concept.prompts()
            chosen = [prompts[i % len(prompts)] for i in range(n_self_images)]
            latents[ci] = draw_latents(pipe, chosen, self_steps, seed)
        else:
            if not concept.images:
                raise FmnError(
                    f"concept {concept.name!r} has no reference images: pass an image folder, "
                    "or let the model draw them (--self-generate N) or use --no-real-image"
                )
            images[ci] = load_images(concept.images, min_size=resolution, keep_alpha=True)
    return References(pipe, resolution, images, latents)


def pixel_weights(drawn: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                  resolution: int) -> torch.Tensor | None:
    """The batch's pixel weights (B, 1, H, W), or None when no reference carries a mask."""
    if all(weights is None for _, weights in drawn):
        return None
    ones = torch.ones(1, 1, resolution, resolution)
    return torch.cat([ones if weights is None else weights for _, weights in drawn])


def held_error(prediction: torch.Tensor, base: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the prediction over the transparent pixels (latent grid)."""
    outside = 1.0 - F.interpolate(weights, size=prediction.shape[-2:], mode="area")
    outside = outside.to(prediction.device, torch.float32)  # (B, 1, h, w)
    squared = (prediction.float() - base.float()) ** 2 * outside
    return squared.sum() / (outside.sum() * prediction.shape[1]).clamp_min(1e-8)
