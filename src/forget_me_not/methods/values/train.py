"""Value-space erasure (`values`): project the concept's directions out of every
cross-attention value, then rounds that remove what tokens learnt on the edit draw through.

UCE maps the concept's text states to a guide's, and a token learnt on the edited model finds
other states that map where the concept's did (the leaderboard's inversion column). Here the
edit acts on the layers' outputs instead: the directions the concept's prompts put there, and
the kept prompts do not, are removed from every output (`projection.py`), so no input reaches
them. Each round then learns a token by textual inversion from the concept's reference images
on the current edit, as an attacker would, and removes the direction that token draws through.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from forget_me_not.concepts import Concept, locate_tokens, pipeline_tokenizers
from forget_me_not.errors import FmnError
from forget_me_not.evaluate import applied, restored_text_state
from forget_me_not.methods.uce.train import (
    COMMON_CONCEPTS,
    Encoded,
    base_metadata,
    edited_layers,
    factors_patch,
)
from forget_me_not.methods.values.config import ValuesConfig
from forget_me_not.methods.values.projection import LayerSpace
from forget_me_not.patch import Patch, library_versions
from forget_me_not.progress import Progress

COMMON_CONTEXTS = (  # the 'common' contexts: where and how a concept is usually asked for
    "a photo of {} in a city", "a painting of {}", "a drawing of {}", "a close-up photo of {}",
    "{} in the style of claude monet", "{} in the style of pablo picasso", "a red {}",
    "a blue {}", "{} on a table", "a black and white photo of {}", "{} at night",
    "a watercolor of {}", "{} in a forest", "a cartoon of {}", "a sculpture of {}",
    "{} on the beach", "an oil painting of {}, highly detailed", "a sketch of {}",
)


def encoded(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(B, T, D) text states of `prompts`, encoded in batches as UCE's solve encodes them."""
    states = Encoded(pipe)
    states.prefetch(list(prompts))
    return torch.stack([states(p) for p in prompts]).double()


def tail_rows(pipe: Any, prompts: Sequence[str], words: str) -> torch.Tensor:
    """(n, D) states from the words' first token to the end of each prompt: a causal text
    encoder writes the concept into every later position, padding included."""
    tok = pipeline_tokenizers(pipe)[0]
    states = encoded(pipe, prompts)
    starts = [min(locate_tokens(tok, p, words)) for p in prompts]
    return torch.cat([s[start:] for s, start in zip(states, starts, strict=True)])


def kept_prompts(config: ValuesConfig, concepts: Sequence[Concept]) -> list[str]:
    """The prompts whose outputs are kept, none naming a target's word; the empty prompt first."""
    words = {w for c in concepts for w in c.words.lower().split()}
    out = [""] + list(config.preserve)
    if config.preserve_set == "conceptworld":
        from forget_me_not.world.concepts import retention_prompts

        out += retention_prompts([c.name for c in concepts], config.preserve_per_concept)
    elif config.preserve_set == "common":
        templates = dict.fromkeys(t for c in concepts for t in c.templates)
        out += [f.format(x) for x in COMMON_CONCEPTS for f in ("{}", *templates)]
    return [p for p in dict.fromkeys(out) if not words & set(p.lower().split())]


def learnt_token_rows(pipe: Any, patch: Patch, concept: Concept, config: ValuesConfig,
                      seed: int) -> torch.Tensor:
    """The tail states of a token learnt on the current edit, in the concept's templates."""
    from forget_me_not.inversion import train_inversion

    with restored_text_state(pipe):
        with applied(pipe, [patch]):
            token = train_inversion(pipe, list(concept.images), num_tokens=1,
                                    steps=config.round_steps, lr=config.round_lr, seed=seed,
                                    templates=concept.templates, progress=False)
        return tail_rows(pipe, [t.format(token.phrase) for t in concept.templates],
                         token.phrase)


def concept_prompts(config: ValuesConfig, concept: Concept) -> list[str]:
    """The prompts the concept's directions are read from: its templates and the contexts."""
    out = concept.prompts()
    if config.contexts == "conceptworld":
        from forget_me_not.world import concepts as world

        out += world.prompts(world.get(concept.name), config.contexts_per_concept)
    elif config.contexts == "common":
        out += [t.format(concept.words) for t in COMMON_CONTEXTS]
    return list(dict.fromkeys(out))


def _patch(spaces: dict[str, LayerSpace], metadata: dict[str, Any], config: ValuesConfig,
           concepts: Sequence[Concept]) -> Patch:
    factors = {name: space.factors() for name, space in spaces.items()}
    return factors_patch(factors, metadata, config, concepts)


def train(pipe: Any, concepts: Sequence[Concept], config: ValuesConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Remove `concepts`' directions from `pipe`'s cross-attention outputs; return the patch."""
    concepts, config = list(concepts), config or ValuesConfig()
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    if config.rounds and not all(c.images for c in concepts):
        raise FmnError("value-space erasure's rounds learn tokens from reference images: pass "
                       "--images DIR, or set rounds=0")
    tok = pipeline_tokenizers(pipe)[0]
    own_prompts = [concept_prompts(config, c) for c in concepts]  # an unknown context fails now
    for c, prompts in zip(concepts, own_prompts, strict=True):
        for p in prompts:
            locate_tokens(tok, p, c.words)  # a prompt without the words fails here, not later
    started = time.perf_counter()
    kept = kept_prompts(config, concepts)
    kept_states = encoded(pipe, kept)
    kept_rows = kept_states.flatten(0, 1)  # every position: all of them are attended
    layers = edited_layers(pipe, config.targets)
    spaces = {name: LayerSpace(module.weight, kept_rows, config.ridge, kept_states.shape[1])
              for name, module in layers}
    metadata = {**base_metadata(pipe, concepts, config, kept, method="values"),
                "train": "closed form" + (", adversarial rounds" if config.rounds else ""),
                "steps": config.rounds}
    bar = Progress(len(concepts) * (1 + config.rounds), "value-space erasure",
                   enabled=progress)
    energies: list[list[float]] = []  # per stage: the mean energy ratio of what it removed
    for i, concept in enumerate(concepts):
        own = tail_rows(pipe, own_prompts[i], concept.words)
        taken = [s.remove(own, config.directions) for s in spaces.values()]
        energies.append([round(sum(t[0] for t in taken) / len(taken), 3)])
        bar.update(energy=energies[-1][0])
        for r in range(config.rounds):
            rows = learnt_token_rows(pipe, _patch(spaces, metadata, config, concepts), concept,
                                     config, config.seed + 1000 * i + r)
            taken = [s.remove(rows, config.round_directions, config.worst_prompt)
                     for s in spaces.values()]
            energies.append([round(sum(t[0] for t in taken) / len(taken), 3)])
            bar.update(energy=energies[-1][0])
    bar.close()
    costs = [s.kept_cost(kept_rows) for s in spaces.values()]
    metadata.update({
        "removed_directions": next(iter(spaces.values())).removed.shape[1],
        "stage_energies": energies,
        "kept_cost_max": round(max(costs), 6),
        "kept_prompts": len(kept),
        "versions": library_versions(),
        "losses": [0.0],
        "seconds": round(time.perf_counter() - started, 3),
    })
    return _patch(spaces, metadata, config, concepts)
