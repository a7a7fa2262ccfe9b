"""G of one ConceptWorld target along a re-steering run: what "Robust mode" in BENCHMARKS.md
("Where the run stops") was measured with.

A run of K steps draws the same timesteps, noise and references as the first K steps of a
longer run with the same seed, so training K steps gives the longer run's state at step K. For
every training seed and K, this trains the recipe for K steps and prints one JSON line with the
target's G (32 samples, seeds 1000+).

    python benchmarks/resteer_trajectory.py conceptworld-robust star --seeds 0,1 \
        --steps 60,80,100,120 --threads 1 [--set fmn.KEY=VALUE ...] [--lora-init-seed 0]

`--lora-init-seed S`: peft's random LoRA init is drawn with seed S instead of the training
seed, to tell the init's part of the seed from the run's draws'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.evaluate import applied
from forget_me_not.judges.world import WorldJudge
from forget_me_not.methods.fmn import trainable
from forget_me_not.models import load_pipeline
from forget_me_not.presets import world_concepts
from forget_me_not.world.scoring import score_concepts


@contextlib.contextmanager
def lora_init_seed(seed: int | None) -> Iterator[None]:
    """Within: the LoRA is initialised with `seed`, whatever the training seed."""
    if seed is None:
        yield
        return
    original = trainable.UnetTrainable._add_lora

    def seeded(self: trainable.UnetTrainable) -> None:
        config, self.config = self.config, dataclasses.replace(self.config, seed=seed)
        try:
            original(self)
        finally:
            self.config = config

    trainable.UnetTrainable._add_lora = seeded
    try:
        yield
    finally:
        trainable.UnetTrainable._add_lora = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("target")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", default="100")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--lora-init-seed", type=int, default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe, judge = load_pipeline("embedded"), WorldJudge()
    for seed in (int(s) for s in a.seeds.split(",")):
        for steps in (int(k) for k in a.steps.split(",")):
            sets = [*a.sets, f"fmn.steps={steps}", f"fmn.seed={seed}"]
            with tempfile.TemporaryDirectory() as tmp, lora_init_seed(a.lora_init_seed):
                concepts = world_concepts([a.target], Path(tmp))
                patch = forget(pipe, concepts, recipe=a.recipe, sets=sets, progress=False)
            with applied(pipe, [patch]):
                g = score_concepts(pipe, judge, [a.target], n=a.n, progress=False)
            print(json.dumps({"recipe": a.recipe, "target": a.target, "sets": a.sets,
                              "seed": seed, "lora_init_seed": a.lora_init_seed,
                              "steps": steps, "G": g[a.target]["rate"]}), flush=True)


if __name__ == "__main__":
    main()
