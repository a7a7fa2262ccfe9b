"""Stopping when the concept is gone: its remaining pull at high noise, checked along the run.

What a prompt adds at high noise over what the run pulls it to is what sets the image's
layout, the object or face it will show: over the empty prompt, or, for a concept with an
anchor (or with `erase_neutral: prompt`), over the same prompt with the anchor or without the
concept's words ("... in outlined style" over "... in solid style"). Its projection on the base
model's own, on latents the base model draws for the concept's prompts, is 1 on the base model,
0 once the prompt asks for nothing more, and negative under the erase term's push. A fixed
number of steps ends wherever the run's last draws leave it; this ends where the measure says
the concept is gone, and otherwise keeps the state where it was lowest.
"""

from __future__ import annotations

from typing import Any

import torch

from forget_me_not.concepts import Concept
from forget_me_not.pipeline_io import Row, draw_latents, encode_plain

# The layout is drawn in the first tenth of sampling: the pull is read at 90% of the schedule.
HIGH_NOISE = 0.9
CHUNK = 8  # latents per forward pass: real models check 512+ px images


class PullCheck:
    """The concepts' remaining pull (the highest over concepts), and the best state so far."""

    def __init__(self, run: Any, rows: list[Row], concepts: list[Concept],
                 seed: int | None = None) -> None:
        cfg = run.config
        seed = cfg.seed if seed is None else seed  # restarts read theirs on the same latents
        by_prompt = getattr(cfg, "erase_neutral", "empty") == "prompt"
        neutral = {(ci, prompt): without if c.anchor or by_prompt else ""
                   for ci, c in enumerate(concepts)
                   for prompt, without in zip(c.prompts(), c.neutral_prompts(), strict=True)}
        self.rows, self.concepts = rows, [row.concept for row in rows]
        self.neutral = encode_plain(run.pipe, [neutral[row.concept, row.prompt] for row in rows])
        latents = draw_latents(run.pipe, [row.prompt for row in rows], cfg.preserve_steps,
                               seed + 5)
        # Its own generator: the run's draws stay those of a run without checks.
        noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
        self.t = torch.full((len(self.rows),), int(HIGH_NOISE * run.n_train_t))
        self.noisy = run.scheduler.add_noise(latents, noise, self.t)
        self.base: torch.Tensor | None = None
        self.history: list[tuple[int, float]] = []
        self.best: tuple[float, int, list[torch.Tensor]] | None = None

    def _pulls(self, run: Any, base: bool) -> torch.Tensor:
        out = []
        for i in range(0, len(self.rows), CHUNK):
            rows, neutral = self.rows[i : i + CHUNK], self.neutral[i : i + CHUNK]
            x = self.noisy[i : i + CHUNK].to(run.device, run.unet.dtype)
            t = self.t[i : i + CHUNK].to(run.device)
            if base:
                prompted, without = ((torch.cat([r.embeds for r in part]).to(run.device),
                                      run.cond(part)) for part in (rows, neutral))
            else:  # the text states as the model in training computes them
                prompted, without = run.live(rows), run.live(neutral)
            with torch.no_grad():
                out.append((run.predict(x, t, *prompted, base=base)
                            - run.predict(x, t, *without, base=base)).float().cpu())
        return torch.cat(out).flatten(1)

    def remaining(self, run: Any) -> float:
        """The highest, over concepts, of the mean pull left (1 = the base model's)."""
        if self.base is None:
            self.base = self._pulls(run, base=True)
        now = self._pulls(run, base=False)
        share = (now * self.base).sum(1) / self.base.pow(2).sum(1).clamp(min=1e-12)
        per_concept = [float(share[[k for k, c in enumerate(self.concepts) if c == concept]].mean())
                       for concept in sorted(set(self.concepts))]
        return max(per_concept)

    def check(self, run: Any, step: int, params: list[torch.nn.Parameter]) -> float:
        """Read the pull after `step` steps and keep the state if it is the lowest so far."""
        value = self.remaining(run)
        self.history.append((step, round(value, 4)))
        if self.best is None or value < self.best[0]:
            self.best = (value, step, [p.detach().clone() for p in params])
        return value

    def restore_best(self, params: list[torch.nn.Parameter]) -> int:
        """Put back the lowest-pull state; returns the step it was read at."""
        assert self.best is not None
        with torch.no_grad():
            for p, kept in zip(params, self.best[2], strict=True):
                p.copy_(kept)
        return self.best[1]


def stop_line(stop: dict[str, Any], threshold: float) -> str:
    """Where a run with stop_pull ended, in one line."""
    pull = dict(stop["pull"]).get(stop["at"])
    if stop["reached"]:
        return f"the pull was {pull} <= {threshold} at step {stop['at']}: stopped there"
    return (f"the pull never fell to {threshold}: kept step {stop['at']}, where it was lowest "
            f"({pull})")
