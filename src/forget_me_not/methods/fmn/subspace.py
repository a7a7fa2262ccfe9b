"""Kept-input projection: a LoRA that cannot change what the kept prompts feed each layer.

For every LoRA'd layer, the inputs the base model gives it while denoising the preserve
prompts' own images (and the empty prompt's, which every guided sample uses) are collected at
timesteps across the schedule; the eigen-directions holding `keep_energy` of their second
moment are protected: each `lora_A` is projected onto the rest after every optimiser step, so
B A x = 0 for any input in the protected span. The forgetting can then only use the directions
the kept prompts barely reach (a null-space constraint, as AlphaEdit puts it for language
models), which a soft retention term on a few sampled prompts does not guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from forget_me_not.pipeline_io import draw_latents, encode_plain

# Timesteps the kept inputs are read at: across the schedule, since both the layout (high
# noise) and the detail (low noise) of a kept prompt must stay.
N_TIMESTEPS = 10
BATCH = 16


def lora_layers(unet: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """The layers carrying the adapter's LoRA, by module name."""
    return {name: m for name, m in unet.named_modules()
            if adapter in getattr(m, "lora_A", {})}


def protected_span(second: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal columns (D, k) of the fewest top eigen-directions holding `energy` of the
    second moment's trace."""
    values, vectors = torch.linalg.eigh(second.double())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    share = values.cumsum(0) / values.sum().clamp(min=1e-30)
    k = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
    return vectors[:, : min(k, len(values))].float()


class KeptInputs:
    """The projectors, one per LoRA'd layer, and their application to `lora_A`."""

    def __init__(self, run: Any, prompts: Sequence[str], adapter: str) -> None:
        cfg = run.config
        self.layers = lora_layers(run.unet, adapter)
        self.adapter = adapter
        prompts = ["", *prompts]
        seconds = self._second_moments(run, prompts)
        self.spans = {name: protected_span(m, cfg.keep_energy) for name, m in seconds.items()}
        self.projectors = {name: torch.eye(u.shape[0]) - u @ u.T
                           for name, u in self.spans.items()}
        self.project()

    def _second_moments(self, run: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        cfg = run.config
        latents = draw_latents(run.pipe, prompts, cfg.preserve_steps, cfg.seed + 5)
        rows = encode_plain(run.pipe, prompts)
        gen = torch.Generator("cpu").manual_seed(cfg.seed + 5)
        moments: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name: str):
            def read(_module: torch.nn.Module, args: tuple) -> None:
                x = args[0].detach().float()
                x = x.reshape(-1, x.shape[-1])
                moments[name] = moments.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            return read

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.layers.items()]
        steps = torch.linspace(0, run.n_train_t - 1, N_TIMESTEPS).round().long()
        try:
            for start in range(0, len(prompts), BATCH):
                index = list(range(start, min(start + BATCH, len(prompts))))
                for t in steps:
                    ts = t.repeat(len(index)).to(run.device)
                    clean = latents[index].to(run.device, run.unet.dtype)
                    noise = torch.randn(clean.shape, generator=gen).to(run.device, clean.dtype)
                    noisy = run.scheduler.add_noise(clean, noise, ts)
                    embeds = torch.cat([rows[i].embeds for i in index]).to(run.device)
                    cond = run.cond([rows[i] for i in index])
                    run.predict(noisy, ts, embeds, cond, base=True)
        finally:
            for h in handles:
                h.remove()
        return {n: (moments[n] / counts[n]).cpu() for n in moments}

    @torch.no_grad()
    def project(self) -> None:
        """Each lora_A (r, D) onto the unprotected directions of its layer's input."""
        for name, module in self.layers.items():
            weight = module.lora_A[self.adapter].weight
            weight.copy_(weight.float() @ self.projectors[name].to(weight.device))

    def line(self) -> str:
        """One log line: how much of the layers' inputs is protected."""
        kept = sum(u.shape[1] for u in self.spans.values())
        width = sum(u.shape[0] for u in self.spans.values())
        return (f"kept inputs: {kept} of {width} input directions protected over "
                f"{len(self.spans)} layers")

    def summary(self) -> dict[str, int]:
        """Protected directions per layer (of its input width)."""
        return {name: int(u.shape[1]) for name, u in self.spans.items()}
