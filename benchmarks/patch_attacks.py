"""A patch file under every attack, as `robust_trials.py` attacks a recipe's patch: G and the
four attacks on one ConceptWorld target (32 samples, seeds 1000+, budget 150, the attacker's own
images: renders of other scenes than the forgetting's references). Nothing is trained: for
patches changed after training (cut, scaled, stacked by hand).

    python benchmarks/patch_attacks.py p.safetensors star --lr 0.005 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from forget_me_not.attacks import ATTACKS, AttackSettings
from forget_me_not.attacks.report import attack_all
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch
from forget_me_not.presets import world_attack_images, world_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("patches", help="patch files, comma-separated (applied together)")
    p.add_argument("target", help="the world concept the patches forget")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=None,
                   help="the inversion attack's learning rate (the leaderboard's: 5e-3)")
    a = p.parse_args()
    missing = [x for x in a.patches.split(",") if not Path(x).is_file()]
    if missing:
        raise SystemExit(f"no patch file {missing[0]}: pass .safetensors patches")
    torch.set_num_threads(a.threads)
    patches = [load_patch(x) for x in a.patches.split(",")]
    pipe = load_pipeline("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        concept = world_concepts([a.target], Path(tmp))[0]
        concept = dataclasses.replace(
            concept, images=world_attack_images(concept.name, Path(tmp) / "attack"))
        r = attack_all(pipe, patches, concept, WorldJudge(), list(ATTACKS),
                       AttackSettings(n=a.n, budget=150, lr=a.lr))
    print(json.dumps({"patches": a.patches, "target": a.target, "G": r["g"],
                      **{n: x.rate for n, x in r["attacks"].items()},
                      "m_score": r["m_score"]}))


if __name__ == "__main__":
    main()
