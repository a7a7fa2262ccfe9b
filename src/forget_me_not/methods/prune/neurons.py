"""The units a concept drives and no kept concept does: where they are, and how hard each fires.

A unit is one input channel of a layer that mixes them: a hidden unit of a transformer block's
feed-forward (the input of `ff.net.2`) or a hidden channel of a resnet block (the input of its
`conv2`). Its activity on a set of images is the peak |activation| over the image, averaged
over the images, the noise levels and the prompts they are read under: a feature drawn in one
place of the picture (a face, a hairdo) shows in the peak, not in a spatial mean. Its effect
is what switching it off does to the noise prediction (`effect`): a unit can fire hard and
matter little, or fire little and carry what a kept concept needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def _noised_batches(pipe: Any, latents: torch.Tensor, prompts: Sequence[str],
                    timesteps: Sequence[float], gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """UNet inputs for `latents` (image i under prompt i mod len, and under the empty prompt),
    noised at each share of the schedule in `timesteps`, in bounded batches."""
    scheduler, device, dtype = pipe.scheduler, pipe.unet.device, pipe.unet.dtype
    resolution = model_resolution(pipe)
    paired = [prompts[i % len(prompts)] for i in range(len(latents))]
    conditions = [encode_prompt(pipe, paired), encode_prompt(pipe, [""] * len(latents))]
    total = int(scheduler.config.num_train_timesteps)
    for states, pooled in conditions:
        for share in timesteps:
            t = torch.full((len(latents),), int(share * total), dtype=torch.long)
            noise = torch.randn(latents.shape, generator=gen)
            noisy = scheduler.add_noise(latents, noise, t)
            for i in range(0, len(latents), BATCH):
                part = slice(i, i + BATCH)
                yield {"sample": noisy[part].to(device, dtype), "timestep": t[part].to(device),
                       "encoder_hidden_states": states[part].detach().to(device, dtype),
                       "added_cond_kwargs": pooled_cond(
                           None if pooled is None else pooled[part].detach(), resolution,
                           device)}


@torch.no_grad()
def activity(pipe: Any, sites: Sequence[Site], latents: torch.Tensor, prompts: Sequence[str],
             timesteps: Sequence[float], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mean peak activity per unit of `latents` (image i read under prompt i mod len, and
    under the empty prompt), noised at each share of the schedule in `timesteps`."""
    recorder = Recorder(sites)
    try:
        for inputs in _noised_batches(pipe, latents, prompts, timesteps, gen):
            pipe.unet(**inputs, return_dict=False)
    finally:
        recorder.close()
    return recorder.means()


def effect(pipe: Any, sites: Sequence[Site], latents: torch.Tensor, prompts: Sequence[str],
           timesteps: Sequence[float], gen: torch.Generator, probes: int = 2
           ) -> dict[str, torch.Tensor]:
    """Per unit, how far switching it off moves the noise prediction for `latents` (read as
    `activity` reads them): the root mean square over images of |d eps / d gate|, the unit's
    gate held at 1, to first order what zeroing it changes. Each image's gradient norm is
    estimated from `probes` random projections of eps (one backward pass each)."""
    unet = pipe.unet
    sums = {s.name: torch.zeros(s.units, dtype=torch.float64) for s in sites}
    count = 0
    gates: dict[str, torch.Tensor] = {}

    def gate(name: str) -> Any:
        def apply(_module: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            h = inputs[0]
            g = gates[name]
            # one gate per image and unit: (B, C, 1, 1) channels first, (B, 1, C) tokens first
            shaped = g[:, :, None, None] if h.dim() == 4 else g[:, None, :]
            return (h * shaped.to(h.dtype), *inputs[1:])
        return apply

    handles = [s.module.register_forward_pre_hook(gate(s.name)) for s in sites]
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.requires_grad_(False)  # gradients reach the gates only: no weight gradients to keep
    try:
        for inputs in _noised_batches(pipe, latents, prompts, timesteps, gen):
            size = len(inputs["sample"])
            for _ in range(probes):
                for s in sites:
                    gates[s.name] = torch.ones(size, s.units, device=unet.device,
                                               requires_grad=True)
                eps = unet(**inputs, return_dict=False)[0]
                probe = torch.randn(eps.shape, generator=gen).to(eps.device, eps.dtype)
                grads = torch.autograd.grad((eps * probe).sum(), [gates[s.name] for s in sites])
                for s, g in zip(sites, grads, strict=True):
                    sums[s.name] += g.detach().double().pow(2).sum(0).cpu()
            count += size * probes
    finally:
        for h in handles:
            h.remove()
        gates.clear()
        for p in trainable:
            p.requires_grad_(True)
    return {n: (v / max(count, 1)).sqrt() for n, v in sums.items()}


def unit_ratios(concept: dict[str, torch.Tensor], kept: Sequence[dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """Per site, each unit's reading on the concept as a multiple of the most any kept group
    gives it."""
    return {name: own / torch.stack([k[name] for k in kept]).amax(0).clamp_min(1e-8)
            for name, own in concept.items()}


def select_units(ratios: dict[str, torch.Tensor], count: int, min_ratio: float = 1.0
                 ) -> tuple[dict[str, list[int]], list[float]]:
    """At most `count` units of the highest ratio, those above `min_ratio` only: {site: [unit,
    ...]}, and their ratios."""
    ranked = [(float(r), name, i) for name, ratio in ratios.items() for i, r in enumerate(ratio)]
    ranked.sort(key=lambda x: (-x[0], x[1], x[2]))  # ties broken by name: deterministic
    chosen = [x for x in ranked[:count] if x[0] > max(min_ratio, 1.0)]
    units: dict[str, list[int]] = {}
    for _, name, i in chosen:
        units.setdefault(name, []).append(i)
    return {n: sorted(v) for n, v in units.items()}, [round(x[0], 4) for x in chosen]

