"""One recipe (with --set overrides) on one ConceptWorld target under every attack, quickly:
what the robust-mode trials in BENCHMARKS.md ("Robust mode") were measured with.

Forgets the target with the recipe, scores every world concept before and after (16 samples,
seeds 1000+), runs the four attacks on the target (inversion, base encoder, paraphrases,
adversarial search; budget 150; the searching attacks learn from renders of other scenes than
the forgetting's references, since 2026-12-06) and prints one JSON line: G and each attack's
rate, the three lowest retentions, the forget seconds. `--on-top-of RECIPE` trains that
recipe first and the given one on top of its patch, and scores the two stacked.

    python benchmarks/robust_trials.py conceptworld-robust star --threads 1 --set fmn.seed=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.attacks import ATTACKS, AttackSettings
from forget_me_not.attacks.report import attack_all
from forget_me_not.evaluate import applied
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.patch.ops import stack_patches
from forget_me_not.presets import world_attack_images, world_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world.scoring import score_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("target", help="a world concept, or several joined by '+'")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--on-top-of", dest="first", default=None,
                   help="a recipe trained first; the recipe is then trained on top of its patch "
                        "(its retention against the base, the first patch's concept held) and "
                        "the two are scored stacked")
    p.add_argument("--lr", type=float, default=None,
                   help="the inversion attack's learning rate (default: the attack's own, 1e-3; "
                        "the leaderboard's world suite uses 5e-3)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    targets = a.target.split("+")
    pipe = load_pipeline("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        concepts = world_concepts(targets, Path(tmp))
        started = time.perf_counter()
        earlier = ([forget(pipe, concepts, recipe=a.first, progress=False)]
                   if a.first else [])
        patch = forget(pipe, concepts, recipe=a.recipe, sets=a.sets, on_top_of=earlier,
                       progress=False)
        if earlier:
            if patch.name == earlier[0].name:
                patch = dataclasses.replace(patch, name=patch.name + "_2")
            patch = stack_patches([earlier[0], patch])
        seconds = time.perf_counter() - started
        stopped = earlier[0] if earlier else patch  # with a stop: where the first stage ended
        judge = WorldJudge()
        names = [c.name for c in wc.all_concepts()]
        base = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=targets)
        with applied(pipe, [patch]):
            after = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=targets)
        kept = {k: after[k]["rate"] / base[k]["rate"] for k in names
                if k not in targets and base[k]["rate"] > 0}
        row = {"recipe": a.recipe, "sets": a.sets, "target": a.target, "on_top_of": a.first,
               "forget_s": round(seconds, 1),
               # with stop_pull: the step kept, and whether the threshold was reached there
               "stopped_at": (stopped.metadata.get("stop") or {}).get("at"),
               "stop_reached": (stopped.metadata.get("stop") or {}).get("reached"),
               "lowest_retention": sorted(kept.items(), key=lambda kv: kv[1])[:3]}
        settings = AttackSettings(n=a.n, budget=150, lr=a.lr)
        for c in concepts:
            # the attacker's own images: other scenes than those the forgetting trained on
            c = dataclasses.replace(c, images=world_attack_images(c.name, Path(tmp) / "attack"))
            r = attack_all(pipe, [patch], c, judge, list(ATTACKS), settings)
            row[c.name] = {"G": r["g"], **{n: x.rate for n, x in r["attacks"].items()}}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
