"""The units a concept drives and no kept concept does: where they are, and how hard each fires.

A unit is one input channel of a layer that mixes them: a hidden unit of a transformer block's
feed-forward (the input of `ff.net.2`) or a hidden channel of a resnet block (the input of its
`conv2`). Its activity on a set of images is the peak |activation| over the image, averaged
over the images, the noise levels and the prompts they are read under: a feature drawn in one
place of the picture (a face, a hairdo) shows in the peak, not in a spatial mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from forget_me_not.data import model_resolution
from forget_me_not.pipeline_io import encode_prompt, pooled_cond

BATCH = 16  # images per UNet call: bounded for real models' 64-128 px latents


@dataclass(frozen=True)
class Site:
    name: str  # the module whose input channels are the units
    module: torch.nn.Module

    @property
    def units(self) -> int:
        w = self.module.weight
        return int(w.shape[1])


def find_sites(unet: Any, kinds: Sequence[str]) -> list[Site]:
    """Every feed-forward output layer ('ff') and resnet `conv2` ('resnet') of the UNet."""
    out = []
    for name, module in unet.named_modules():
        if "ff" in kinds and name.endswith(".ff.net.2") and isinstance(module, torch.nn.Linear):
            out.append(Site(name, module))
        elif ("resnet" in kinds and ".resnets." in name and name.endswith(".conv2")
              and isinstance(module, torch.nn.Conv2d)):
            out.append(Site(name, module))
    return out


class Recorder:
    """Forward hooks that add up each site's per-image peak |activation| per unit."""

    def __init__(self, sites: Sequence[Site]) -> None:
        self.sums = {s.name: torch.zeros(s.units, dtype=torch.float64) for s in sites}
        self.count = {s.name: 0 for s in sites}
        self._handles = [s.module.register_forward_pre_hook(self._hook(s.name)) for s in sites]

    def _hook(self, name: str) -> Any:
        def record(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            h = inputs[0].detach().abs().float()
            # (B, C, H, W) channels first; (B, N, C) tokens first
            peak = h.flatten(2).amax(-1) if h.dim() == 4 else h.amax(1)
            self.sums[name] += peak.sum(0).double().cpu()
            self.count[name] += peak.shape[0]
        return record

    def means(self) -> dict[str, torch.Tensor]:
        return {n: self.sums[n] / max(self.count[n], 1) for n in self.sums}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def activity(pipe: Any, sites: Sequence[Site], latents: torch.Tensor, prompts: Sequence[str],
             timesteps: Sequence[float], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mean peak activity per unit of `latents` (image i read under prompt i mod len, and
    under the empty prompt), noised at each share of the schedule in `timesteps`."""
    unet, scheduler = pipe.unet, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    resolution = model_resolution(pipe)
    paired = [prompts[i % len(prompts)] for i in range(len(latents))]
    conditions = [encode_prompt(pipe, paired), encode_prompt(pipe, [""] * len(latents))]
    total = int(scheduler.config.num_train_timesteps)
    recorder = Recorder(sites)
    try:
        for states, pooled in conditions:
            for share in timesteps:
                t = torch.full((len(latents),), int(share * total), dtype=torch.long)
                noise = torch.randn(latents.shape, generator=gen)
                noisy = scheduler.add_noise(latents, noise, t)
                for i in range(0, len(latents), BATCH):
                    part = slice(i, i + BATCH)
                    cond = pooled_cond(None if pooled is None else pooled[part], resolution,
                                       device)
                    unet(noisy[part].to(device, dtype), t[part].to(device),
                         encoder_hidden_states=states[part].to(device, dtype),
                         added_cond_kwargs=cond, return_dict=False)
    finally:
        recorder.close()
    return recorder.means()


def skilled_units(concept: dict[str, torch.Tensor], kept: Sequence[dict[str, torch.Tensor]],
                  count: int, min_ratio: float = 1.0) -> tuple[dict[str, list[int]], list[float]]:
    """At most `count` units whose activity on the concept is highest as a multiple of the most
    any kept group gives them, those above `min_ratio` only: {site: [unit, ...]}, and their
    ratios."""
    ranked: list[tuple[float, str, int]] = []
    for name, own in concept.items():
        most = torch.stack([k[name] for k in kept]).amax(0)
        ratio = own / most.clamp_min(1e-8)
        ranked += [(float(r), name, i) for i, r in enumerate(ratio)]
    ranked.sort(key=lambda x: (-x[0], x[1], x[2]))  # ties broken by name: deterministic
    chosen = [x for x in ranked[:count] if x[0] > max(min_ratio, 1.0)]
    units: dict[str, list[int]] = {}
    for _, name, i in chosen:
        units.setdefault(name, []).append(i)
    return {n: sorted(v) for n, v in units.items()}, [round(x[0], 4) for x in chosen]
