"""Does the inversion attack read lower because it learns from the very images the forgetting
trained on? On the leaderboard both use a world concept's reference renders at seed 0.

Forgets a ConceptWorld target with a recipe (its references: renders at seed 0, as `fmn forget`
and `fmn bench` make them), then runs textual inversion on the patched model and on the base
model with anchors from those references and from renders at other seeds (scenes the forgetting
never saw), at the leaderboard's settings (budget 150, lr 5e-3, samples at seeds 1000+). Prints
one JSON line: inversion rate per (model, anchor seed).

    python benchmarks/anchor_overlap.py conceptworld-by-kind tavi --n 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.attacks import AttackSettings, run
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.presets import world_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("target", help="one world concept")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anchor-seeds", default="0,1", help="render seeds of the attack's anchors "
                   "(0: the forgetting's own references)")
    p.add_argument("--attack-seed", type=int, default=1000)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    judge = WorldJudge()
    settings = AttackSettings(n=a.n, budget=150, lr=5e-3, seed=a.attack_seed)
    row: dict = {"recipe": a.recipe, "target": a.target, "n": a.n, "attack_seed": a.attack_seed}
    with tempfile.TemporaryDirectory() as tmp:
        trained_on = world_concepts([a.target], Path(tmp) / "train")
        started = time.perf_counter()
        patch = forget(pipe, trained_on, recipe=a.recipe, progress=False)
        row["forget_s"] = round(time.perf_counter() - started, 1)
        for seed in (int(s) for s in a.anchor_seeds.split(",")):
            concept = (trained_on[0] if seed == 0 else
                       world_concepts([a.target], Path(tmp) / f"anchors{seed}", seed=seed)[0])
            for label, patches in (("patched", [patch]), ("base", [])):
                found = run("inversion", pipe, patches, concept, judge, settings)
                row[f"{label}_anchors{seed}"] = found.rate
                print(json.dumps({k: row[k] for k in row if k.endswith(f"anchors{seed}")}),
                      flush=True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
