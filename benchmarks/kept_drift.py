"""How far a patch moves the kept prompts' samples, read without a judge.

The kept prompts (the world's retention set, the target's words left out) are drawn by the base
model and by the patched model from the same seeds; per sample, the mean squared difference of
the final latents over the base latents' mean square. Printed per patch as one JSON line: the
mean, the 90th percentile and the largest. It asks whether a judge-free reading of the change
could choose between runs as the judge's retention would.

    python benchmarks/kept_drift.py TARGET PATCH [PATCH ...] --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch

from forget_me_not.evaluate import applied
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch
from forget_me_not.pipeline_io import draw_latents
from forget_me_not.world.concepts import retention_prompts
from forget_me_not.world.defaults import default_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="the world concept the patches forget")
    p.add_argument("patches", nargs="+", help="patch files, each read on its own")
    p.add_argument("--seeds", default="0,1", help="seeds of the kept prompts' samples")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    prompts = list(retention_prompts([a.target]))
    seeds = [int(s) for s in a.seeds.split(",")]
    steps = default_steps(pipe)
    base = torch.cat([draw_latents(pipe, prompts, steps, s) for s in seeds])
    scale = base.pow(2).flatten(1).mean(1)
    for path in a.patches:
        with applied(pipe, [load_patch(path)]):
            got = torch.cat([draw_latents(pipe, prompts, steps, s) for s in seeds])
        drift = (got - base).pow(2).flatten(1).mean(1) / scale
        print(json.dumps({"patch": path, "samples": len(drift),
                          "drift_mean": round(drift.mean().item(), 4),
                          "drift_q90": round(drift.quantile(0.9).item(), 4),
                          "drift_max": round(drift.max().item(), 4)}), flush=True)


if __name__ == "__main__":
    main()
