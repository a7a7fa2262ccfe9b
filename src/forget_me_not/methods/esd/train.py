"""ESD: for a random step of a guided sampling of the concept's prompt with the frozen model,
the trained model's prediction for the concept is pulled to e_c - eta (e_c - e_0), the frozen
model's guidance turned against the concept (as the official `esd_sd.py` trains it)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from forget_me_not.concepts import Concept
from forget_me_not.data import model_resolution
from forget_me_not.errors import FmnError
from forget_me_not.methods.esd.config import EsdConfig
from forget_me_not.methods.fmn.trainable import UnetTrainable
from forget_me_not.patch import Patch, family_of, library_versions, model_hash, run_name
from forget_me_not.pipeline_io import Row, added_cond, autocast, encode_prompt, freeze
from forget_me_not.progress import Progress


def _row(pipe: Any, prompt: str) -> Row:
    with torch.no_grad():
        embeds, pooled = encode_prompt(pipe, prompt)
    return Row(-1, embeds.detach(), None if pooled is None else pooled.detach(), [], prompt)


class _Sampler:
    """Partial guided denoising with the frozen model: x_t at a chosen step of the schedule."""

    def __init__(self, pipe: Any, config: EsdConfig, empty: Row) -> None:
        self.pipe, self.config, self.empty = pipe, config, empty
        self.resolution = model_resolution(pipe)
        side = self.resolution // int(getattr(pipe, "vae_scale_factor", 8))
        self.shape = (1, pipe.unet.config.in_channels, side, side)

    def predict(self, x, t, rows: list[Row]) -> torch.Tensor:
        unet, device = self.pipe.unet, self.pipe.unet.device
        hidden = torch.cat([r.embeds for r in rows]).to(device)
        cond = added_cond(self.pipe, rows, self.resolution, device)
        with autocast(device, self.config.mixed_precision):
            return unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=cond,
                        return_dict=False)[0]

    def x_t(self, concept: Row, stop: int, gen: torch.Generator):
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(self.config.sample_steps)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        x = (torch.randn(self.shape, generator=gen) * scheduler.init_noise_sigma).to(device, dtype)
        g = self.config.guidance_scale
        for t in scheduler.timesteps[:stop]:
            both = scheduler.scale_model_input(torch.cat([x, x]), t)
            e_0, e_c = self.predict(both, t, [self.empty, concept]).chunk(2)
            x = scheduler.step(e_0 + g * (e_c - e_0), t, x).prev_sample
        return x, scheduler.timesteps[stop]


def train(pipe: Any, concepts: Sequence[Concept], config: EsdConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Fine-tune `pipe`'s UNet away from `concepts` with ESD; return the patch."""
    concepts, config = list(concepts), config or EsdConfig()
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    freeze(pipe)
    base_hash = model_hash(pipe)
    rows = [_row(pipe, c.words) for c in concepts]  # the official script prompts the bare words
    sampler = _Sampler(pipe, config, _row(pipe, ""))
    gen = torch.Generator("cpu").manual_seed(config.seed)
    trainable = UnetTrainable(pipe.unet, config)
    losses: list[float] = []
    started = time.perf_counter()
    try:
        params = trainable.setup()
        optimizer = torch.optim.Adam(params, lr=config.lr)
        bar = Progress(config.iterations, "ESD", enabled=progress)
        for step in range(config.iterations):
            concept = rows[step % len(rows)]
            stop = int(torch.randint(0, config.sample_steps, (1,), generator=gen))
            with torch.no_grad(), trainable.base_weights():
                x, t = sampler.x_t(concept, stop, gen)
                e_0, e_c = sampler.predict(torch.cat([x, x]), t, [sampler.empty, concept]).chunk(2)
            target = e_c - config.negative_guidance * (e_c - e_0)
            loss = F.mse_loss(sampler.predict(x, t, [concept]).float(), target.float())
            if not torch.isfinite(loss):
                raise FmnError(f"the ESD loss became {loss.item()} at step {step + 1}: lower the "
                               "learning rate (--lr) or train in float32; nothing was written")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(loss=losses[-1])
        bar.close()
        kind, tensors, lora_config = trainable.result()
    finally:
        trainable.restore()
    metadata = {
        "method": "esd",
        "concepts": [c.to_dict() for c in concepts],
        "family": family_of(pipe),
        "base_model_hash": base_hash,
        "train": {"xattn": "esd-x", "noxattn": "esd-u", "lora": "esd-x lora"}[config.train],
        "steps": config.iterations,
        "seed": config.seed,
        "settings": dataclasses.asdict(config),
        "versions": library_versions(),
        "losses": losses,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Patch(kind, tensors, metadata, lora_config, run_name("esd", concepts, metadata))
