"""Skilled-neuron pruning (`prune`): switch off the UNet units the concept's images drive and
no kept concept's do, in the spirit of ConceptPrune (Chavhan et al., 2024).

Re-steering and closed-form edits change how prompts reach the UNet; textual inversion then
learns a new token that reaches the same drawing machinery again. A unit that fires for the
concept's features, whatever the prompt, is part of that machinery: zeroing its outgoing
weights takes the features away from every input. The units are read on the concept's
reference images and on the base model's own samples of the kept concepts, each noised at
several levels and read under its prompts and the empty prompt; a unit is chosen when the
concept drives it harder than any kept concept does. The patch is full-weight deltas (the
chosen input columns set to zero), so removing it restores the model exactly.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from forget_me_not.concepts import Concept
from forget_me_not.data import load_images, model_resolution, resize_random_crop
from forget_me_not.errors import FmnError
from forget_me_not.methods.prune.config import PruneConfig
from forget_me_not.methods.prune.neurons import (
    Site,
    activity,
    effect,
    find_sites,
    select_units,
    unit_ratios,
)
from forget_me_not.methods.uce.train import COMMON_CONCEPTS, base_metadata
from forget_me_not.patch import Patch, library_versions, run_name
from forget_me_not.pipeline_io import draw_latents, encode_images
from forget_me_not.progress import Progress

READINGS = {"activity": "activation statistics", "effect": "gate gradient statistics",
            "both": "activation and gate gradient statistics"}


def kept_groups(config: PruneConfig, concepts: Sequence[Concept]) -> list[tuple[str, list[str]]]:
    """(name, prompts) of every kept concept, none naming a target."""
    words = {w for c in concepts for w in c.words.lower().split()}
    named = [re.compile(rf"\b{re.escape(c.words.lower())}\b") for c in concepts]
    if config.kept_set == "conceptworld":
        from forget_me_not.world import concepts as world

        groups = [(c.name, world.prompts(c, config.kept_prompts, sorted(words)))
                  for c in world.all_concepts() if c.name not in words]
    elif config.kept_set == "common":
        templates = list(dict.fromkeys(t for c in concepts for t in c.templates))
        groups = [(x, [t.format(x) for t in templates[: config.kept_prompts]])
                  for x in COMMON_CONCEPTS]
    else:
        groups = []
    groups += [(p, [p]) for p in config.preserve]
    out = [(name, [p for p in prompts if not any(n.search(p.lower()) for n in named)])
           for name, prompts in groups]
    return [(name, prompts) for name, prompts in out if prompts]


def concept_latents(pipe: Any, concept: Concept, config: PruneConfig,
                    gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """The concept's latents: its reference images encoded, or without any, the base model's
    own samples of its prompts (what it draws for them is what must go)."""
    if not concept.images:
        prompts = concept.prompts()
        prompts = [prompts[i % len(prompts)] for i in range(config.concept_samples)]
        return draw_latents(pipe, prompts, config.sample_steps, config.seed), "base samples"
    size = model_resolution(pipe)
    images = load_images(concept.images, min_size=size)
    pixels = torch.stack([resize_random_crop(im, size, gen) for im in images])
    latents = torch.cat([encode_images(pipe, pixels[i : i + 16], gen)
                         for i in range(0, len(pixels), 16)]).float().cpu()
    return latents, "images"


def pruned_patch(sites: Sequence[Site], units: dict[str, list[int]], metadata: dict[str, Any],
                 concepts: Sequence[Concept]) -> Patch:
    """Full-weight deltas that zero each chosen unit's outgoing weights."""
    tensors = {}
    for site in sites:
        if site.name not in units:
            continue
        weight = site.module.weight.detach().float().cpu()
        delta = torch.zeros_like(weight)
        idx = torch.tensor(units[site.name])
        delta[:, idx] = -weight[:, idx]
        tensors[f"unet.{site.name}.weight"] = delta.contiguous()
    return Patch("delta", tensors, metadata, None, run_name("prune", concepts, metadata))


def unit_readings(pipe: Any, sites: Sequence[Site], groups: Sequence[tuple[str, list[str]]],
                  kept_latents: Sequence[torch.Tensor], concepts: Sequence[Concept],
                  config: PruneConfig, score: str, bar: Progress
                  ) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Per concept, each unit's ratio (its reading by `score` on the concept over the most any
    kept group gives it), and where the concept's images came from."""
    gen = torch.Generator().manual_seed(config.seed)  # each score reads the same noise
    read = activity if score == "activity" else effect
    kept = []
    for (_, prompts), latents in zip(groups, kept_latents, strict=True):
        kept.append(read(pipe, sites, latents, prompts, config.timesteps, gen))
        bar.update()
    out, sources = [], []
    for concept in concepts:
        latents, source = concept_latents(pipe, concept, config, gen)
        sources.append(source)
        own = read(pipe, sites, latents, concept.prompts(), config.timesteps, gen)
        out.append(unit_ratios(own, kept))
        bar.update()
    return out, sources


def train(pipe: Any, concepts: Sequence[Concept], config: PruneConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Prune the units only `concepts` drive in `pipe`'s UNet; return the patch."""
    concepts, config = list(concepts), config or PruneConfig()
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    sites = find_sites(pipe.unet, config.sites)
    if not sites:
        raise FmnError(f"this UNet has no {'/'.join(config.sites)} layers to prune: use "
                       f"sites from {', '.join(('ff', 'resnet'))}")
    groups = kept_groups(config, concepts)
    if not groups:
        raise FmnError("no kept prompt is left once the targets' words are removed: choose "
                       "another kept_set")
    started = time.perf_counter()
    scores = ("activity", "effect") if config.score == "both" else (config.score,)
    bar = Progress(len(groups) + len(scores) * (len(groups) + len(concepts)), "reading units",
                   enabled=progress)
    kept_latents = []
    for i, (_, prompts) in enumerate(groups):
        kept_latents.append(draw_latents(pipe, prompts, config.sample_steps, config.seed + i))
        bar.update()
    per_score = [unit_readings(pipe, sites, groups, kept_latents, concepts, config, score, bar)
                 for score in scores]
    sources = per_score[0][1]
    count = max(1, round(config.fraction * sum(s.units for s in sites)))
    units: dict[str, set[int]] = {}
    ratios: list[list[float]] = []
    for c in range(len(concepts)):
        # 'both': a unit's lower ratio, so either reading alone can veto it
        combined = {name: torch.stack([r[0][c][name] for r in per_score]).amin(0)
                    for name in per_score[0][0][c]}
        chosen, r = select_units(combined, count, config.min_ratio)
        for name, idx in chosen.items():
            units.setdefault(name, set()).update(idx)
        ratios.append(r)
    bar.close()
    note = None
    if not any(units.values()):
        # in a recipe beside re-steering this part then changes nothing, and says so
        note = (f"no unit reads {config.min_ratio}x higher ({config.score}) for the concept "
                "than for the kept concepts: nothing pruned (lower min_ratio to prune shared "
                "units)")
        warnings.warn(note, stacklevel=2)
    chosen_units = {n: sorted(v) for n, v in units.items()}
    metadata = {**base_metadata(pipe, concepts, config, [p for _, ps in groups for p in ps],
                                method="prune"),
                "train": READINGS[config.score], "steps": 0,
                "pruned_units": chosen_units,
                "units_total": sum(s.units for s in sites),
                "units_pruned": sum(len(v) for v in chosen_units.values()),
                "ratios": ratios,
                "concept_source": sources,
                **({"note": note} if note else {}),
                "versions": library_versions(),
                "losses": [0.0],
                "seconds": round(time.perf_counter() - started, 3)}
    return pruned_patch(sites, chosen_units, metadata, concepts)
