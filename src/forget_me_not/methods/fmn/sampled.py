"""Retention through the sampler: kept prompts' images, drawn from fixed seeds by the model in
training and differentiated through every sampling step, held to the base model's.

The one-step retention (`terms.Preserve`) holds each denoising step on latents the base model
visits; a change that moves every step a little still moves where a sample ends, most of all
where the path passes near a boundary (a fill becomes an outline, a colour another). This term
holds the end of the path itself, as DRaFT (Clark et al. 2024) trains through the sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from forget_me_not.methods.fmn.terms import Term
from forget_me_not.pipeline_io import Row, encode_plain
from forget_me_not.world.defaults import default_guidance


class SampledKeep(Term):
    """`preserve_batch` kept prompts a step, each from a seed of its own that changes every
    pass over the prompts, drawn with `preserve_steps` DDIM steps at the model's guidance."""

    name, draws_at = "sampled_keep", 6

    def __init__(self, run: Any, prompts: tuple[str, ...]) -> None:
        cfg = run.config
        super().__init__(cfg.sample_keep_weight)
        self.rows = encode_plain(run.pipe, prompts)
        self.empty = encode_plain(run.pipe, [""])[0]
        self.guidance = default_guidance(run.pipe)
        self.scheduler = DDIMScheduler.from_config(run.pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.preserve_steps)
        unet = run.unet.config
        side = run.resolution // int(getattr(run.pipe, "vae_scale_factor", 8))
        self.shape = (unet.in_channels, side, side)

    def before(self, run: Any, step: Any) -> None:
        cfg = run.config
        first = step.number * cfg.preserve_batch
        self.index = [(first + j) % len(self.rows) for j in range(cfg.preserve_batch)]
        # Its own seed per (prompt, pass): no draw from the run's generator, so the other
        # terms' draws are those of a run without this term.
        passes = [(first + j) // len(self.rows) for j in range(cfg.preserve_batch)]
        noise = [torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(
            cfg.seed * 1_000_003 + p * 10_007 + i)) for i, p in zip(self.index, passes,
                                                                   strict=True)]
        self.noise = torch.stack(noise).to(run.device, run.unet.dtype)
        rows = [self.rows[i] for i in self.index]
        with torch.no_grad(), run.trainable.base_weights(True):
            self.base = self.draw(run, rows, [self.empty] * len(rows))

    def draw(self, run: Any, rows: list[Row], empty: list[Row]) -> torch.Tensor:
        """The latents the model as it is draws for `rows` from `self.noise` (with a graph
        when gradients are on)."""
        both = empty + rows
        embeds = torch.cat([row.embeds for row in both]).to(run.device)
        cond = run.cond(both)
        latents = self.noise * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            timesteps = t.expand(2 * len(rows)).to(run.device)
            pred = run.unet(torch.cat([latents, latents]), timesteps,
                            encoder_hidden_states=embeds, added_cond_kwargs=cond,
                            return_dict=False)[0]
            unprompted, prompted = pred.chunk(2)
            guided = unprompted + self.guidance * (prompted - unprompted)
            latents = self.scheduler.step(guided, t, latents).prev_sample
        return latents

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        run.probes.deactivate()
        rows = run.trainable.live([self.rows[i] for i in self.index])
        empty = run.trainable.live([self.empty] * len(rows))
        drawn = self.draw(run, rows, empty)
        return torch.nn.functional.mse_loss(drawn.float(), self.base.float())
