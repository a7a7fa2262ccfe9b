"""Measure the embedded ConceptWorld model and judge against their acceptance targets.

Judge: accuracy on fresh renders (never seen in training). Model: for every concept, >= 32
samples (25 steps, the model's default guidance, fixed seeds) from its trained prompt forms,
scored by the judge; held-out (subject, style) pairs; the planted role entanglement; and the
time to sample 64 images. Writes JSON (and prints a Markdown table) for BENCHMARKS.md.

    python benchmarks/world_quality.py --n 32 --out runs/world_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from forget_me_not.judges.world import WorldJudge, images_to_tensor
from forget_me_not.models import load_pipeline
from forget_me_not.world import concepts as wc
from forget_me_not.world import vocab
from forget_me_not.world.captions import random_scene
from forget_me_not.world.defaults import default_guidance
from forget_me_not.world.judge_model import HEADS, labels_for
from forget_me_not.world.render import render
from forget_me_not.world.scoring import sample_many, score_concepts


def judge_on_renders(judge: WorldJudge, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    x = images_to_tensor([render(s) for s in scenes])
    with torch.no_grad():
        probs = judge.net.probabilities(x)
    out = {}
    for head in HEADS:
        truth = torch.tensor([labels_for(s)[head] for s in scenes])
        keep = torch.ones(n, dtype=torch.bool)
        if head == "colour":  # IDs have no colour of their own to read
            keep = torch.tensor([s.colour is not None for s in scenes])
        out[head] = float((probs[head].argmax(-1) == truth)[keep].float().mean())
    return out


def rate(readings: list[dict], head: str, label: str) -> float:
    return float(np.mean([r[head][0] == label for r in readings]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/world_quality.json"))
    ap.add_argument("--held-out-n", type=int, default=None, help="samples per held-out pair "
                    "(default: --n)")
    ap.add_argument("--only", choices=("speed", "held-out"), default=None,
                    help="measure one part only: the 64-image timing, or the held-out pairs")
    a = ap.parse_args()
    torch.manual_seed(0)
    judge = WorldJudge()
    pipe = load_pipeline(a.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    guidance = a.guidance or default_guidance(pipe)
    result: dict = {
        "date": str(date.today()),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "n": a.n,
        "guidance": guidance,
    }
    # speed: 64 images, one batch of 64, 25 steps, after a small warm-up batch (one-time
    # allocations and kernel choices are not sampling time)
    pipe(["a red star"] * 4, num_inference_steps=25, guidance_scale=guidance)
    t0 = time.perf_counter()
    gen = [torch.Generator().manual_seed(a.seed + i) for i in range(64)]
    pipe(["a red star"] * 64, num_inference_steps=25, guidance_scale=guidance, generator=gen)
    result["seconds_for_64_images"] = time.perf_counter() - t0
    if a.only == "speed":
        print(json.dumps(result, indent=1))
        return
    if a.only is None:
        result["judge_on_renders"] = judge_on_renders(judge, 2000, seed=a.seed)
        scores = score_concepts(pipe, judge, n=a.n, seed=a.seed, guidance=guidance)
        result["concepts"] = {name: v["rate"] for name, v in scores.items()}
        result["concepts"]["role_hat"] = scores[vocab.ROLE]["hat"]
    held = wc.held_out_prompts()
    reps = a.held_out_n or a.n
    prompts = [p for _, p in held for _ in range(reps)]
    seeds = [a.seed + i for _ in held for i in range(reps)]
    readings = judge.describe(sample_many(pipe, prompts, seeds, guidance=guidance))
    held_scores = {}
    for k, (subject, prompt) in enumerate(held):
        mine = readings[k * reps : (k + 1) * reps]
        held_scores[prompt] = rate(mine, "subject", subject)
    result["held_out_n"] = reps
    result["held_out"] = held_scores
    result["held_out_mean"] = float(np.mean(list(held_scores.values())))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
