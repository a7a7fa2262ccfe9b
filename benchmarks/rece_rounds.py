"""RECE's rounds one by one on a ConceptWorld target: G after each number of rounds and ridge.

For each setting, trains `conceptworld-rece` with it, scores the target's G (16 samples, seeds
1000+) and prints one JSON line with the rounds' gaps (how far each round's derived states
brought the edited layers back to the base output), the patch's rank and the text width.

    python benchmarks/rece_rounds.py tavi epochs=0 epochs=1 epochs=1,regular_scale=0.1 epochs=2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.evaluate import applied
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.presets import world_concepts
from forget_me_not.world.scoring import score_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target")
    p.add_argument("settings", nargs="+", help="comma-joined KEY=VALUE pairs, one run each")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    judge = WorldJudge()
    width = pipe.text_encoder.config.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        concepts = world_concepts([a.target], Path(tmp))
        for setting in a.settings:
            sets = [s for s in setting.split(",") if s]
            patch = forget(pipe, concepts, recipe="conceptworld-rece", sets=sets, progress=False)
            with applied(pipe, [patch]):
                g = score_concepts(pipe, judge, [a.target], n=a.n, progress=False)
            print(json.dumps({"target": a.target, "sets": sets, "G": g[a.target]["rate"],
                              "round_gaps": patch.metadata["round_gaps"],
                              "rank": patch.metadata["rank"], "text_width": width}), flush=True)


if __name__ == "__main__":
    main()
