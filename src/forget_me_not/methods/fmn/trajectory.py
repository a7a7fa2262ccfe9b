"""Retention on the changed model's own sampling path: the kept prompts sampled by the model in
training from fixed seeds (no graph), and at every state it visits, its predictions (prompted
and unprompted) held to the base model's at that same state.

The one-step retention (`terms.Preserve`) holds states the base model visits; once the change
moves a path, the states it then visits are held by nothing (exposure bias, as DAgger corrects
by labelling the learner's own states). Each state is labelled by the base model.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from forget_me_not.methods.fmn.terms import Term
from forget_me_not.pipeline_io import encode_plain
from forget_me_not.world.defaults import default_guidance


class TrajectoryKeep(Term):
    name, draws_at = "trajectory_keep", 6

    def __init__(self, run: Any, prompts: tuple[str, ...]) -> None:
        cfg = run.config
        super().__init__(cfg.trajectory_keep_weight)
        self.rows = encode_plain(run.pipe, prompts)
        self.empty = encode_plain(run.pipe, [""])[0]
        self.guidance = default_guidance(run.pipe)
        self.scheduler = DDIMScheduler.from_config(run.pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.preserve_steps)
        side = run.resolution // int(getattr(run.pipe, "vae_scale_factor", 8))
        self.shape = (run.unet.config.in_channels, side, side)

    def before(self, run: Any, step: Any) -> None:
        cfg = run.config
        first = step.number * cfg.preserve_batch
        index = [(first + j) % len(self.rows) for j in range(cfg.preserve_batch)]
        passes = [(first + j) // len(self.rows) for j in range(cfg.preserve_batch)]
        # Seeds of its own, so the other terms draw as in a run without this one.
        noise = torch.stack([torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(
            cfg.seed * 1_000_003 + p * 10_007 + i)) for i, p in zip(index, passes, strict=True)])
        rows = run.trainable.live([self.rows[i] for i in index])
        n = len(rows)
        both = [*run.trainable.live([self.empty] * n), *rows]
        embeds = torch.cat([row.embeds for row in both]).to(run.device)
        cond = run.cond(both)
        latents = noise.to(run.device, run.unet.dtype) * self.scheduler.init_noise_sigma
        states, times = [], []
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                states.append(latents)
                times.append(t.expand(n))
                pred = run.predict(torch.cat([latents, latents]), t.expand(2 * n).to(run.device),
                                   embeds, cond)
                unprompted, prompted = pred.chunk(2)
                guided = unprompted + self.guidance * (prompted - unprompted)
                latents = self.scheduler.step(guided, t, latents).prev_sample
        # Every state of the path, each with its prompt and the empty prompt.
        x = torch.cat(states)
        self.x = torch.cat([x, x])
        self.t = torch.cat(times).repeat(2).to(run.device)
        steps = len(states)
        self.embeds = torch.cat([embeds[:n].repeat(steps, 1, 1), embeds[n:].repeat(steps, 1, 1)])
        self.cond = None if cond is None else {k: torch.cat([v[:n].repeat(steps, 1),
                                                             v[n:].repeat(steps, 1)])
                                               for k, v in cond.items()}
        self.base = run.predict(self.x, self.t, self.embeds, self.cond, base=True)

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        return run.matched(self.x, self.t, self.embeds, self.cond, self.base)
