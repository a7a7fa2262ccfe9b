"""What every method does with a pipeline: encode prompts and images, draw latents, autocast.

One public module so the methods, textual inversion and the evaluation share one way of talking
to a diffusers pipeline (SD 1.x, 2.x, SDXL and the embedded model alike).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "unet")


@dataclass
class Row:
    """One encoded prompt a training loop cycles through."""

    concept: int  # index of the concept it belongs to; -1 for regulariser and anchor prompts
    embeds: torch.Tensor  # (1, T, D) text encoder states
    pooled: torch.Tensor | None  # (1, P) SDXL pooled embedding
    positions: list[int]  # concept token positions in the T-token sequence
    prompt: str = ""  # kept so a loop that trains the text side can re-encode it


def text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders, in order (one for SD 1/2, two for SDXL)."""
    encs = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    return [e for e in encs if e is not None]


def freeze(pipe: Any) -> None:
    """Every part of the pipeline frozen; a method then opts its own tensors in."""
    for part in FROZEN_PARTS:
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)


def encode_prompt(pipe: Any, prompt: str | list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own prompt encoding, no guidance: (states (B,T,D), pooled or None)."""
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is not None:
        out = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return out[0], out[2]
    out = pipe.encode_prompt(prompt, device, 1, False)
    return out[0], None


def encode_plain(pipe: Any, prompts: Sequence[str]) -> list[Row]:
    """Prompts encoded once, without concept positions (regulariser and anchor rows)."""
    rows = []
    for prompt in prompts:
        with torch.no_grad():
            embeds, pooled = encode_prompt(pipe, prompt)
        rows.append(
            Row(-1, embeds.detach(), None if pooled is None else pooled.detach(), [], prompt)
        )
    return rows


def encode_images(pipe: Any, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """VAE-encode (B, 3, H, W) pixels in [-1, 1] into scaled latents (B, C, h, w), sampled."""
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
        latents = dist.mean + dist.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def draw_latents(pipe: Any, prompts: Sequence[str], steps: int, seed: int) -> torch.Tensor:
    """One latent per prompt (N, C, h, w), drawn by the model as it is now; seeded.

    Already scaled latents; a generator per image keeps each image's noise its own.
    """
    out = []
    for i in range(0, len(prompts), 16):  # bounded batches: real models draw 512+ px images
        chunk = list(prompts[i : i + 16])
        gens = [torch.Generator("cpu").manual_seed(seed * 10_007 + i + j)
                for j in range(len(chunk))]
        with torch.no_grad():
            result = pipe(chunk, num_inference_steps=steps, generator=gens, output_type="latent")
        out.append(result.images.detach().to("cpu", torch.float32))
    return torch.cat(out)


def added_cond(
    pipe: Any, batch: Sequence[Row], resolution: int, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """SDXL's extra conditioning: pooled text embedding + (size, crop, target size) ids."""
    if batch[0].pooled is None:
        return None
    return pooled_cond(torch.cat([row.pooled for row in batch]), resolution, device)


def pooled_cond(pooled: torch.Tensor | None, resolution: int, device: torch.device
                ) -> dict[str, torch.Tensor] | None:
    """`added_cond` from pooled embeddings (B, P) directly (None: not SDXL)."""
    if pooled is None:
        return None
    text_embeds = pooled.to(device)
    # Same ids the pipeline uses at inference for a full, uncropped image at its native size.
    ids = [resolution, resolution, 0, 0, resolution, resolution]
    time_ids = torch.tensor([ids] * len(text_embeds), dtype=text_embeds.dtype, device=device)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward passes ("no", "fp16", "bf16"); trained tensors stay fp32."""
    if precision == "no":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        yield
