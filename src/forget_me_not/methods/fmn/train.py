"""FMN (Forget-Me-Not, Zhang et al. 2023): re-steer the UNet's cross-attention away from a
concept's tokens. The result is a `Patch` (a LoRA, or a weight delta); the pipeline is left as
it was."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn.config import FmnConfig
from forget_me_not.methods.fmn.loop import EndPull, resolve, run_loop
from forget_me_not.methods.fmn.trainable import UnetTrainable, coarse_modules, coarse_part
from forget_me_not.patch import Patch, family_of, library_versions, model_hash, run_name


def train(pipe: Any, concepts: Sequence[Concept], config: FmnConfig | None = None, *,
          progress: bool = True) -> Patch:
    """Re-steer `concepts` away in `pipe`'s UNet; return the patch (the pipeline unchanged)."""
    concepts = list(concepts)
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    config = resolve(config or FmnConfig(), concepts)
    if config.ship_levels != "all" and config.train != "lora":
        # checked on the resolved config: a recipe's train and a --set may come from apart
        raise FmnError(f"ship_levels={config.ship_levels} keeps part of a LoRA: set "
                       "train=lora, or ship_levels=all")
    # before training: a UNet with one cross-attention level has no coarse part
    shipped = (coarse_modules(pipe.unet, config.lora_targets)
               if config.ship_levels == "coarse" else None)
    base_hash = model_hash(pipe)
    out = restarted(pipe, concepts, config, shipped, progress)
    if shipped is not None:
        out["tensors"], out["lora_config"] = coarse_part(shipped, out["tensors"],
                                                         out["lora_config"])
    return to_patch(pipe, "fmn", concepts, config, out, base_hash)


def restarted(pipe: Any, concepts: list[Concept], config: FmnConfig,
              shipped: list[str] | None, progress: bool) -> dict[str, Any]:
    """`config.restarts` runs from consecutive seeds; the one with the lowest pull at its end."""
    if config.restarts == 1:
        return run_loop(pipe, concepts, config, UnetTrainable(pipe.unet, config), progress)
    reading = EndPull(config.seed, shipped)
    best: dict[str, Any] = {}
    tried = []
    for number in range(config.restarts):
        seeded = dataclasses.replace(config, seed=config.seed + number)
        out = run_loop(pipe, concepts, seeded, UnetTrainable(pipe.unet, seeded), progress,
                       label=f"re-steering, run {number + 1}/{config.restarts}",
                       end_pull=reading)
        tried.append({"seed": seeded.seed, "pull": out["end_pull"], "seconds": out["seconds"]})
        if not best or out["end_pull"] < best["end_pull"]:
            best, kept = out, seeded.seed
    best["restarts"] = {"runs": tried, "kept": kept}
    best["seconds"] = round(sum(r["seconds"] for r in tried), 3)
    if progress:
        print(f"re-steering: kept the run from seed {kept} (pull at the end "
              f"{best['end_pull']}; {len(tried)} runs)", file=sys.stderr)
    return best


def to_patch(pipe: Any, method: str, concepts: list[Concept], config: Any, out: dict[str, Any],
             base_hash: str) -> Patch:
    """The loop's result as a patch that records the method, its resolved config and its logs."""
    metadata = {
        "method": method,
        "concepts": [c.to_dict() for c in concepts],
        "family": family_of(pipe),
        "base_model_hash": base_hash,
        "train": getattr(config, "train", method),
        "steps": config.steps,
        "seed": config.seed,
        "settings": dataclasses.asdict(config),
        "versions": library_versions(),
        "losses": out["losses"],
        "term_losses": out["term_losses"],
        "seconds": out["seconds"],
    }
    if "stop" in out:  # where the run stopped, and the pull read along it
        metadata["stop"] = out["stop"]
    if "restarts" in out:  # each run's seed and end pull, and the one kept
        metadata["restarts"] = out["restarts"]
    return Patch(kind=out["kind"], tensors=out["tensors"], metadata=metadata,
                 lora_config=out["lora_config"], name=run_name("fmn", concepts, metadata))
