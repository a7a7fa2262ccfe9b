"""What a recipe costs the other ConceptWorld concepts, without attacks: forget the target,
score every world concept before and after (32 samples, seeds 1000+), print one JSON line with
the target's G and the five lowest retentions.

    python benchmarks/retention_only.py conceptworld-prune tavi --set fraction=0.02
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
from forget_me_not.world import concepts as wc
from forget_me_not.world.scoring import score_concepts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("target")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe, judge = load_pipeline("embedded"), WorldJudge()
    names = [c.name for c in wc.all_concepts()]
    with tempfile.TemporaryDirectory() as tmp:
        patch = forget(pipe, world_concepts([a.target], Path(tmp)), recipe=a.recipe,
                       sets=a.sets, progress=False)
    base = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
    with applied(pipe, [patch]):
        after = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
    kept = {k: after[k]["rate"] / base[k]["rate"] for k in names
            if k != a.target and base[k]["rate"] > 0}
    print(json.dumps({"recipe": a.recipe, "sets": a.sets, "target": a.target,
                      "G": after[a.target]["rate"], "units": patch.metadata.get("units_pruned"),
                      "low": sorted(kept.items(), key=lambda kv: kv[1])[:5]}))


if __name__ == "__main__":
    main()
