"""Image-side gating, a trial: the concept's feature directions taken out of the UNet's hidden
features only in samples where they show beyond anything the kept concepts draw (in the spirit
of GLoCE, Lee et al., CVPR 2025: training-free, a gate on image features, not on the prompt).

At every feed-forward hidden layer and resnet hidden channel of the UNet (the sites pruning
reads), the hidden features of the concept's references and of the base model's own samples
of its prompts are compared with the base model's samples of every other world concept (each
noised at pruning's five levels, read under its prompts and the empty prompt). The `rank`
directions where the concept's features spread most beyond the kept ones' (a generalised
eigenproblem, kept covariance whitened) are kept with the kept features' range along each
(quantiles `q`, `1 - q` over tokens). Modes:
- `token`: every token outside the range along any direction is moved to the kept mean there;
- `image`: the same, in a sample whose most out-of-range token exceeds every kept read's
  (quantile `1 - qi` of kept reads) and nowhere else: a gate per sample;
- `image-all`: in such a sample, every token moved to the kept mean along the directions.
Each configuration is scored like `robust_trials.py` (every world concept before and after,
`--n` samples at seeds 1000+, the target's prompts avoided) and, where G falls to 10% or
below, under inversion, paraphrases and the adversarial search (budget 150, inversion at 5e-3,
the attacker's own images). The base text encoder attack is left out: the text side is
untouched, so it is G. Prints one JSON line per configuration.

    python benchmarks/gate_trial.py star --n 8 --configs image:16:1e-3:0,token:16:1e-2:0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from forget_me_not.attacks import AttackSettings
from forget_me_not.attacks.report import attack_all
from forget_me_not.judges.world import WorldJudge
from forget_me_not.methods.prune.config import PruneConfig
from forget_me_not.methods.prune.neurons import Site, find_sites
from forget_me_not.methods.prune.train import concept_latents, kept_groups
from forget_me_not.models import load_pipeline
from forget_me_not.pipeline_io import draw_latents, encode_prompt
from forget_me_not.presets import world_attack_images, world_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world.scoring import score_concepts

MODES = ("token", "image", "image-all")


def tokens_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, tokens, C)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2) if x.dim() == 4 else x


@torch.no_grad()
def read(pipe: Any, sites: list[Site], latents: torch.Tensor, prompts: list[str],
         timesteps: tuple[float, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every site's hidden features, (reads, tokens, C) in half precision: each latent noised
    at every level, under its prompt and under the empty prompt."""
    got: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def hook(name: str) -> Any:
        return lambda _m, inputs: got[name].append(tokens_last(inputs[0].detach()).half())

    handles = [s.module.register_forward_pre_hook(hook(s.name)) for s in sites]
    paired = [prompts[i % len(prompts)] for i in range(len(latents))]
    total = int(pipe.scheduler.config.num_train_timesteps)
    try:
        for states, _ in (encode_prompt(pipe, paired), encode_prompt(pipe, [""] * len(latents))):
            for share in timesteps:
                t = torch.full((len(latents),), int(share * total), dtype=torch.long)
                noisy = pipe.scheduler.add_noise(latents, torch.randn(latents.shape,
                                                                      generator=gen), t)
                pipe.unet(noisy, t, encoder_hidden_states=states, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def excess(z: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far each token lies outside the kept range, over the directions."""
    return (torch.relu(z - g["hi"]) + torch.relu(g["lo"] - z)).norm(dim=-1)


def fit(target: torch.Tensor, kept: torch.Tensor, rank: int, q: float,
        qi: float) -> dict[str, torch.Tensor]:
    flat = kept.flatten(0, 1).float()
    flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:300_000]]
    mu = flat.mean(0)
    centred = flat - mu
    cov = centred.T @ centred / len(centred)
    d = cov.shape[0]
    cov = cov + 1e-3 * cov.trace() / d * torch.eye(d)  # a floor: some channels barely move
    ev, vec = torch.linalg.eigh(cov)
    whiten = vec @ torch.diag(ev.rsqrt()) @ vec.T
    t = target.flatten(0, 1).float() - mu
    spread, dirs = torch.linalg.eigh(whiten @ (t.T @ t / len(t)) @ whiten)
    w = whiten @ dirs[:, -rank:]  # z = w^T (h - mu): unit kept variance per direction
    g = {"mu": mu, "w": w, "back": cov @ w,  # w^T back = I: a change of z, and of z alone
         "lo": torch.quantile(centred @ w, q, dim=0),
         "hi": torch.quantile(centred @ w, 1 - q, dim=0)}

    def scores(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([excess((h[i:i + 64].float() - mu) @ w, g).amax(-1)
                          for i in range(0, len(h), 64)])

    g["tau"] = torch.quantile(scores(kept), 1 - qi)
    g["spread"] = spread[-rank:].flip(0)
    g["fires"] = (scores(target) > g["tau"]).float().mean()
    return g


class Gate:
    """Hooks that edit the sites' inputs while applied: duck-types a patch for the attacks."""

    def __init__(self, sites: list[Site], fits: dict[str, dict[str, torch.Tensor]],
                 mode: str) -> None:
        self.sites, self.fits, self.mode, self.handles = sites, fits, mode, []

    def edit(self, g: dict[str, torch.Tensor]) -> Any:
        def hook(_m: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = inputs[0]
            h = tokens_last(x)
            z = (h - g["mu"]) @ g["w"]
            outside = ((z < g["lo"]) | (z > g["hi"])).any(-1, keepdim=True)
            dz = torch.where(outside, -z, torch.zeros_like(z))
            if self.mode != "token":
                fire = (excess(z, g).amax(-1) > g["tau"]).to(z.dtype)[:, None, None]
                dz = fire * (-z if self.mode == "image-all" else dz)
            h = h + dz @ g["back"].T
            if x.dim() == 4:
                h = h.unflatten(1, x.shape[2:]).permute(0, 3, 1, 2)
            return (h, *inputs[1:])
        return hook

    def apply(self, _pipe: Any) -> None:
        self.handles = [s.module.register_forward_pre_hook(self.edit(self.fits[s.name]))
                        for s in self.sites]

    def remove(self, _pipe: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target")
    p.add_argument("--configs", default="image:16:1e-3:0",
                   help="MODE:RANK:Q:QI, comma-separated (MODE: token, image, image-all)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--own-samples", type=int, default=32,
                   help="the base model's samples of the concept read beside its references")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    specs = [s.split(":") for s in a.configs.split(",")]
    if any(len(s) != 4 or s[0] not in MODES for s in specs):
        raise SystemExit(f"--configs: MODE:RANK:Q:QI with MODE one of {', '.join(MODES)}")
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    config = PruneConfig()
    sites = find_sites(pipe.unet, config.sites)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        concept = world_concepts([a.target], Path(tmp))[0]
        gen = torch.Generator().manual_seed(config.seed)
        reads: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        for i, (_, prompts) in enumerate(kept_groups(config, [concept])):
            latents = draw_latents(pipe, prompts, config.sample_steps, config.seed + i)
            for k, v in read(pipe, sites, latents, prompts, config.timesteps, gen).items():
                reads[k].append(v)
        kept = {k: torch.cat(v) for k, v in reads.items()}
        latents, _ = concept_latents(pipe, concept, config, gen)
        own_prompts = [concept.prompts()[i % len(concept.prompts())]
                       for i in range(a.own_samples)]
        latents = torch.cat([latents, draw_latents(pipe, own_prompts, config.sample_steps,
                                                   config.seed + 997)])
        target = read(pipe, sites, latents, concept.prompts(), config.timesteps, gen)
        read_s = time.perf_counter() - started
        judge = WorldJudge()
        names = [c.name for c in wc.all_concepts()]
        base = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
        for mode, rank, q, qi in specs:
            fits = {s.name: fit(target[s.name], kept[s.name], int(rank), float(q), float(qi))
                    for s in sites}
            gate = Gate(sites, fits, mode)
            gate.apply(pipe)
            try:
                after = score_concepts(pipe, judge, names, n=a.n, progress=False,
                                       avoid=[a.target])
            finally:
                gate.remove(pipe)
            kept_rate = {k: after[k]["rate"] / base[k]["rate"] for k in names
                         if k != a.target and base[k]["rate"] > 0}
            row: dict[str, Any] = {
                "target": a.target, "mode": mode, "rank": int(rank), "q": float(q),
                "qi": float(qi), "n": a.n, "read_s": round(read_s, 1),
                "G": after[a.target]["rate"], "G_before": base[a.target]["rate"],
                "lowest_retention": sorted(kept_rate.items(), key=lambda kv: kv[1])[:3],
                # the share of the concept's reads the gate opens on, per site
                "fires": {k: round(float(g["fires"]), 2) for k, g in fits.items()}}
            if row["G"] <= 0.1:
                attacker = dataclasses.replace(
                    concept, images=world_attack_images(concept.name, Path(tmp) / "attack"))
                r = attack_all(pipe, [gate], attacker, judge,
                               ["inversion", "prompts", "adversarial"],
                               AttackSettings(n=a.n, budget=150, lr=0.005))
                row["attacks"] = {k: x.rate for k, x in r["attacks"].items()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
