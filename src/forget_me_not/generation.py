"""Seeded sampling from a pipeline: sample i always uses seed + i, whatever the batch size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from forget_me_not.errors import FmnError


def vae_scale_factor(pipe) -> int:
    """Pixels per latent cell (8 for Stable Diffusion, 2 for the tiny test models)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(factor)


def default_size(pipe) -> int:
    """The image side the UNet was trained for."""
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * vae_scale_factor(pipe)


MAX_SIZE = 4096  # checked before a model loads: no model here is trained above 1024 px
SIZE_FACTOR = 4  # the largest side allowed, in units of the model's trained resolution


def check_size(pipe, size: int) -> None:
    factor = vae_scale_factor(pipe)
    limit = SIZE_FACTOR * default_size(pipe)
    if size > limit:
        raise FmnError(f"--size {size} is far above this model's trained {default_size(pipe)} px: "
                       f"use {factor}..{limit}")
    if size < 1 or size % factor:
        raise FmnError(
            f"--size {size} is not a positive multiple of this model's VAE factor {factor}; "
            f"try {max(factor, round(size / factor) * factor)}"
        )


def warn_if_cut(pipe, prompt: str) -> None:
    """A prompt longer than the text encoder reads is cut there: say so, once."""
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        return
    length = len(tok(prompt, truncation=False)["input_ids"])
    if length > tok.model_max_length:
        import warnings

        warnings.warn(f"the prompt is {length} tokens; the text encoder reads the first "
                      f"{tok.model_max_length}, so the rest is cut: shorten it", stacklevel=3)


def generate_images(
    pipe,
    prompt: str,
    *,
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    negative: str | None = None,
    size: int | None = None,
    batch_size: int = 4,
    on_step: Callable[[], None] | None = None,
) -> list[Image.Image]:
    """`n` images of `prompt`; sample i is drawn from a CPU generator seeded with seed + i, so
    the pixels depend on neither the batch size nor the device's random number generator."""
    if n < 1 or steps < 1 or batch_size < 1:
        raise FmnError("n, steps and batch size must be positive integers")
    size = size or default_size(pipe)
    check_size(pipe, size)
    warn_if_cut(pipe, prompt)

    def callback(_pipe, _i, _t, kwargs):
        if on_step is not None:
            on_step()
        return kwargs

    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
        out = pipe(
            prompt=[prompt] * count,
            negative_prompt=[negative] * count if negative else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
            callback_on_step_end=callback,
        )
        images.extend(out.images)
    return images
