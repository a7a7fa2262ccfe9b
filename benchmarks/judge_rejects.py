"""How often the world judge's reject class turns away the base model's own good samples, and
how often it catches a forgetting's degraded ones: what "The judge's reject class on the
model's samples" in BENCHMARKS.md was measured with.

For every world concept: its G prompts, n samples of the embedded model, seeds seed+i (the
leaderboard's). "heads" counts a sample when the concept's head reads it (ignoring the reject
head); "G" when it is also kept; "turned away" is the share of the head-read samples that
the reject head rejects. With --patch, the samples of the forgotten concept's prompts under
that patch are also read: the share rejected and what the heads say of the kept ones.

    python benchmarks/judge_rejects.py runs/judge_rejects --judge JUDGE.safetensors
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from judge_choice import add_judge_option, chosen_judge, judge_digest

from forget_me_not.bench.suites import load_suite
from forget_me_not.evaluate import applied, load_patches, patch_targets
from forget_me_not.files import write_atomic
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.sampling import generation_score


def samples(pipe, judge: WorldJudge, concept, n: int, seed: int) -> list:
    """The concept's G samples, drawn exactly as the leaderboard draws them."""
    return generation_score(pipe, concept, judge, n=n, seed=seed).images


def read(judge: WorldJudge, images: list, concept) -> dict:
    head, label = judge._head_and_label(concept.name)
    probs = judge.heads(images)
    on_head = probs[head][:, label] >= judge.threshold
    kept = probs["reject"][:, 0] >= 0.5
    g = judge.probabilities(images, concept) >= judge.threshold
    turned = float((on_head & ~kept).sum() / max(1, on_head.sum()))
    return {"heads": float(on_head.mean()), "g": float(g.mean()), "turned_away": turned,
            "rejected": float((~kept).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    add_judge_option(p)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concepts", help="comma-separated base rows (default: every world concept)")
    p.add_argument("--patch", action="append", default=[], help="a forgetting patch (repeatable)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    judge = chosen_judge(a.judge)
    pipe = load_pipeline("embedded")
    entries = [e for e in load_suite("world").select(None) if e.group == "main"]
    rows = []
    wanted = a.concepts.split(",") if a.concepts else [e.concept.name for e in entries]
    for e in (e for e in entries if e.concept.name in wanted):
        row = {"concept": e.concept.name,
               **read(judge, samples(pipe, judge, e.concept, a.n, a.seed), e.concept)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    forgotten = []
    names = {e.concept.name: e.concept for e in entries}
    for path in a.patch:
        (patch,) = load_patches([path])
        with applied(pipe, [patch]):
            for target in patch_targets(patch):
                concept = names[target]
                images = samples(pipe, judge, concept, a.n, a.seed)
                kept = judge.heads(images)["reject"][:, 0] >= 0.5
                said = Counter(d["subject"][0] for d, k in zip(judge.describe(images), kept,
                                                              strict=True) if k)
                forgotten.append({"patch": Path(path).name, "concept": concept.name,
                                  "rejected": float((~kept).mean()), "kept_read_as": dict(said)})
                print(json.dumps(forgotten[-1]), flush=True)
    digest = judge_digest(a.judge)
    result = {"judge": f"{a.judge.name} sha256 {digest}", "n": a.n, "seed": a.seed, "base": rows,
              "mean_turned_away": float(np.mean([r["turned_away"] for r in rows])),
              "forgotten": forgotten}
    a.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    write_atomic(a.out / "judge_rejects.json", lambda tmp: Path(tmp).write_text(text))
    print(f"mean turned away {result['mean_turned_away']:.1%}")


if __name__ == "__main__":
    main()
