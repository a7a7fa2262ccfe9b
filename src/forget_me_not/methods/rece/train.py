"""RECE (Gong et al., ECCV 2024): a UCE edit, then rounds that find what still draws the concept.

Each round derives, in closed form, the text states e* that make the edited to_k / to_v give
what the unedited ones gave for the concept's prompt c (over every edited layer l at once):
  e* = c (sum_l W'_l^T W'_l + r I)^-1 (sum_l W'_l^T W_l)^T       (regularised toward zero)
and erases e* toward the guide prompt's states with UCE's solve on the current weights, the
empty prompt and the preserved states held. Every round's edit is low-rank, so the patch is
the stacked factors of the UCE edit and of each round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from forget_me_not.concepts import Concept
from forget_me_not.methods.rece.config import ReceConfig
from forget_me_not.methods.uce.edit import System, low_rank_edit
from forget_me_not.methods.uce.train import Encoded, base_metadata, factors_patch, solve_edit
from forget_me_not.patch import Patch, library_versions
from forget_me_not.progress import Progress


def adversarial_states(prompt_states: torch.Tensor, current: list[torch.Tensor],
                       base: list[torch.Tensor], ridge: float) -> torch.Tensor:
    """(T, D) states that the current layers map closest to what the base layers gave for
    `prompt_states` (T, D), every layer weighed alike."""
    width = prompt_states.shape[1]
    gram = ridge * torch.eye(width, dtype=torch.float64)
    cross = torch.zeros(width, width, dtype=torch.float64)
    for now, then in zip(current, base, strict=True):
        gram += now.T @ now
        cross += now.T @ then
    coefficient = torch.linalg.solve(gram, cross)  # (D, D): e* = c coefficient^T
    return prompt_states.double() @ coefficient.T


def train(pipe: Any, concepts: Sequence[Concept], config: ReceConfig | None = None, *,
          progress: bool = True) -> Patch:
    """UCE's edit of `concepts`, then `epochs` adversarial rounds; return the stacked patch."""
    concepts, config = list(concepts), config or ReceConfig()
    started = time.perf_counter()
    states, layers, first = solve_edit(pipe, concepts, config)
    base = [module.weight.detach().double().cpu() for _, module in layers]
    edits = [[edit] for edit in first]
    current = [w + e["B"].double() @ e["A"].double() for w, e in zip(base, first, strict=True)]
    encoded = Encoded(pipe)  # whole sequences, padding included, as the official rounds take
    encoded.prefetch([p for pair in states.prompts for p in pair] + [""])
    prompts = torch.cat([encoded(p) for p, _ in states.prompts]).double()
    guides = torch.cat([encoded(g) for _, g in states.prompts])
    held = torch.cat([states.preserved, encoded("")])  # the official rounds keep '' as well
    bar = Progress(config.epochs, "RECE rounds", enabled=progress and config.epochs > 0)
    gaps = []
    wanted = [prompts @ then.T for then in base]  # the base layers' outputs for the prompts
    for _ in range(config.epochs):
        derived = adversarial_states(prompts, current, base, config.regular_scale)
        # how far the derived states bring the edited layers back to the base's output
        gap = sum(float((derived @ now.T - out).norm() / out.norm())
                  for now, out in zip(current, wanted, strict=True)) / len(base)
        gaps.append(round(gap, 6))
        system = System(derived.float(), guides, held, config.round_erase_scale,
                        config.round_preserve_scale, config.round_lamb)
        for i, w in enumerate(current):
            edit = low_rank_edit(w, system)
            edits[i].append(edit)
            current[i] = w + edit["B"].double() @ edit["A"].double()
        bar.update(gap=gap)
    bar.close()
    factors = {name: {"B": torch.cat([e["B"] for e in parts], dim=1),
                      "A": torch.cat([e["A"] for e in parts], dim=0)}
               for (name, _), parts in zip(layers, edits, strict=True)}
    flat = [e for parts in edits for e in parts]
    metadata = {
        **base_metadata(pipe, concepts, config, states.kept, method="rece"),
        "train": "closed form, adversarial rounds",
        "steps": config.epochs,
        "edited_states": states.erased.shape[0],
        "round_states": prompts.shape[0],
        "round_gaps": gaps,
        "reconstruction_error": max(e["error"] for e in flat),
        "condition_number": max(e["condition"] for e in flat),
        "versions": library_versions(),
        "losses": [0.0],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return factors_patch(factors, metadata, config, concepts)
