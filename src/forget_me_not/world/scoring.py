"""Judge-measured scores of a model on ConceptWorld: how often each concept is drawn.

For every concept, `n` samples from its trained prompt forms (sample i: seed + i) are read by the
judge on the head that concerns it: subject for objects, unsafe objects and IDs, style for
styles, colour for colours; the role counts as drawn when the judge reads its ID. An image the
judge rejects ("none of these") counts as no concept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from forget_me_not.world import concepts as wc
from forget_me_not.world import vocab

HEAD_OF_KIND = {"object": "subject", "nsfw": "subject", "id": "subject", "role": "subject",
                "style": "style", "colour": "colour"}


def target_label(c: wc.WorldConcept) -> str:
    return vocab.ROLE_ID if c.kind == "role" else c.name


@torch.no_grad()
def sample_many(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25,
                guidance: float = 7.5, batch_size: int = 64, progress: bool = True) -> list:
    """One image per (prompt, seed), batched across different prompts."""
    images = []
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress,
                  leave=False):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        out = pipe(prompt=list(prompts[i : i + batch_size]), generator=gens,
                   num_inference_steps=steps, guidance_scale=guidance)
        images += out.images
    return images


def score_concepts(pipe, judge, names: Sequence[str] | None = None, *, n: int = 32,
                   seed: int = 1000, steps: int = 25, guidance: float = 7.5,
                   progress: bool = True, avoid: Sequence[str] = ()) -> dict[str, dict]:
    """{concept: {"rate": share drawn, "hat": share with the hat, "images": [...]}}.

    `avoid`: words (forgotten concepts) that no other concept's prompts may contain.
    """
    chosen = [wc.get(x) for x in names] if names else wc.all_concepts()
    prompts, seeds, owner = [], [], []
    for c in chosen:
        prompts += wc.prompts(c, n, avoid)
        seeds += [seed + i for i in range(n)]
        owner += [c.name] * n
    images = sample_many(pipe, prompts, seeds, steps=steps, guidance=guidance, progress=progress)
    probs = judge.heads(images)
    out: dict[str, dict] = {}
    for c in chosen:
        idx = [i for i, o in enumerate(owner) if o == c.name]
        read = read_labels(probs, idx, c.kind)
        out[c.name] = {
            "rate": float(np.mean([r == target_label(c) for r in read])),
            "hat": float(np.mean([probs["hat"][i].argmax() == 1 for i in idx])),
            "images": [images[i] for i in idx],
            "prompts": [prompts[i] for i in idx],
        }
    return out


def read_labels(probs: dict, indices: Sequence[int], kind: str) -> list[str]:
    """The judge's label of each image on the head of `kind` ('none' where it rejects it)."""
    head = HEAD_OF_KIND[kind]
    labels = judge_labels(head)
    return [labels[int(probs[head][i].argmax())] if probs["reject"][i].argmax() == 0
            else "none" for i in indices]


def judge_labels(head: str) -> tuple[str, ...]:
    from forget_me_not.world.judge_model import HEADS

    return HEADS[head]
