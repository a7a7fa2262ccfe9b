"""Forget ConceptWorld concepts one at a time and measure target and retention with the judge.

For each target: re-steer with the given settings (default: the library defaults), apply the
patch, score every world concept with the same seeds as the base model, remove the patch.
Writes JSON and prints a Markdown table (target before -> after, every other concept's
after/before ratio, and on prompts that name the target beside another concept, e.g. "a
purple star", how often that other concept is still drawn). With `--placebo K`, also K control
patches of the same size per layer in random directions (`forget_me_not.placebo`).

    python benchmarks/forget_world.py --targets star,tavi,dotted --n 32 --placebo 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.api import overrides as api_overrides
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.placebo import placebo
from forget_me_not.world import concepts as wc
from forget_me_not.world import vocab
from forget_me_not.world.captions import HELD_OUT
from forget_me_not.world.defaults import default_guidance
from forget_me_not.world.scoring import judge_labels, sample_many, score_concepts


def rates(scores: dict) -> dict[str, float]:
    return {k: v["rate"] for k, v in scores.items()}


def companions(target: str, n: int) -> list[tuple[str, str, str]]:
    """`n` (prompt, judge head, label) where the prompt names the target beside another
    concept, which should still be drawn once the target is forgotten: an object's colour
    and style, an ID's style and hat, a style's subject and colour (trained pairs only)."""
    kind = wc.get(target).kind
    colours = list(vocab.COLOURS)
    styles = [s for s in vocab.STYLES if (target, s) not in HELD_OUT]
    shapes = [x for x in ("circle", "square", "heart", "moon") if (x, target) not in HELD_OUT]
    out: list[tuple[str, str, str]] = []
    i = 0
    while len(out) < n:
        colour = colours[i % len(colours)]
        style = styles[i % len(styles)]
        if kind in ("object", "nsfw"):
            out += [(f"a {colour} {target}", "colour", colour),
                    (f"a {target} in {style} style", "style", style)]
        elif kind == "id":
            out += [(f"{target} in {style} style", "style", style),
                    (f"{target} wearing a hat", "hat", "yes")]
        else:  # a style: the subject and its colour stay
            shape = shapes[i % len(shapes)]
            prompt = f"a {colour} {shape} in {target} style"
            out += [(prompt, "subject", shape), (prompt, "colour", colour)]
        i += 1
    return out[:n]


def companion_rates(pipe, judge, items, seed: int, guidance: float) -> dict[str, float]:
    """Per head, the share of the prompts whose other concept the judge reads."""
    images = sample_many(pipe, [p for p, _, _ in items], [seed + i for i in range(len(items))],
                         guidance=guidance, progress=False)
    probs = judge.heads(images)
    hits: dict[str, list[bool]] = {}
    for i, (_, head, label) in enumerate(items):
        read = judge_labels(head)[int(probs[head][i].argmax())]
        hits.setdefault(head, []).append(read == label)
    return {head: sum(v) / len(v) for head, v in hits.items()}


def retention(after: dict, base: dict, target: str) -> dict[str, float | None]:
    """Every other concept's rate after / before (None where the base never drew it)."""
    return {k: (after[k] / base[k] if base[k] > 0 else None) for k in base if k != target}


def world_rates(pipe, judge, a, guidance: float, avoid: list[str], progress: bool = True):
    """Every world concept's rate with the pipeline as it is (the same seeds each time)."""
    return rates(score_concepts(pipe, judge, n=a.n, seed=a.seed, guidance=guidance, avoid=avoid,
                                progress=progress))


def placebo_rates(pipe, judge, control, a, guidance: float, avoid: list[str]) -> dict[str, float]:
    """Every world concept's rate with a placebo patch applied."""
    control.apply(pipe)
    try:
        return world_rates(pipe, judge, a, guidance, avoid, progress=False)
    finally:
        control.remove(pipe)


def placebo_summary(controls: list[dict], base: dict, target: str) -> dict:
    kept = [retention(c, base, target) for c in controls]
    lowest = [min((v, k) for k, v in r.items() if v is not None) for r in kept]
    return {
        "target": [c[target] for c in controls],
        "retention_min": [v for v, _ in lowest],
        "lowest": [k for _, k in lowest],
        "below_90": [{k: v for k, v in r.items() if v is not None and v < 0.9} for r in kept],
        "after_all": controls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--targets", default="star,tavi,dotted")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="re-steering steps (default: library)")
    ap.add_argument("--lr", default=None, help="learning rate, or several: 1e-4,1e-3")
    ap.add_argument("--recipe", default=None, help="a recipe name or file (default: the "
                    "family's)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE recipe override")
    ap.add_argument("--placebo", type=int, default=0,
                    help="also score K placebo patches per target: the patch's size per layer in "
                         "random directions (what the size of the change alone costs)")
    ap.add_argument("--out", type=Path, default=Path("runs/forget_world.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(a.model, "cpu")
    judge = WorldJudge()
    guidance = default_guidance(pipe)
    t0 = time.perf_counter()
    # No concept's prompts name a target (its own excepted): "a blue star" must not count
    # against "blue" once the star is forgotten.
    avoid = a.targets.split(",")
    base = world_rates(pipe, judge, a, guidance, avoid)
    result = {
        "date": str(date.today()),
        "threads": torch.get_num_threads(),
        "n": a.n,
        "avoided_words": avoid,
        "base": base,
        "base_seconds": time.perf_counter() - t0,
        "runs": {},
    }
    lrs = [float(x) for x in a.lr.split(",")] if a.lr else [None]
    runs = [(t, lr) for t in a.targets.split(",") for lr in lrs]
    for target, lr in runs:
        sets = [*api_overrides(steps=a.steps, lr=lr), *a.set]
        named = companions(target, a.n * 2)
        named_before = companion_rates(pipe, judge, named, a.seed, guidance)
        with tempfile.TemporaryDirectory() as refs:
            concept = wc.fmn_concept(target, refs)
            t1 = time.perf_counter()
            patch = forget(pipe, concept, recipe=a.recipe, sets=sets, progress=False)
            seconds = time.perf_counter() - t1
        patch.apply(pipe)
        after = world_rates(pipe, judge, a, guidance, avoid)
        named_after = companion_rates(pipe, judge, named, a.seed, guidance)
        patch.remove(pipe)
        others = retention(after, base, target)
        kept = [v for v in others.values() if v is not None]
        controls = [
            placebo_rates(pipe, judge, placebo(patch, seed), a, guidance, avoid)
            for seed in range(1, a.placebo + 1)
        ]
        control_summary = placebo_summary(controls, base, target) if controls else None
        result["runs"][f"{target}@{lr}"] = {
            "seconds": seconds,
            "before": base[target],
            "after": after[target],
            "after_all": after,
            "retention": others,
            "retention_min": min(kept),
            "retention_mean": sum(kept) / len(kept),
            "below_90": {k: v for k, v in others.items() if v is not None and v < 0.9},
            "settings": patch.metadata["settings"],
            # prompts naming the target beside another concept: is that one still drawn?
            "named_with_target": {h: [named_before[h], named_after[h]] for h in named_before},
            **({"placebo": control_summary} if control_summary else {}),
        }
        print(
            f"| {target} lr={lr} | {base[target]:.2f} -> {after[target]:.2f} | "
            f"min {min(kept):.2f} / mean {sum(kept) / len(kept):.2f} | "
            + ", ".join(f"{h} {named_before[h]:.2f} -> {named_after[h]:.2f}"
                        for h in named_before)
            + f" | {seconds:.1f} s |",
            flush=True,
        )
        if control_summary:
            rows = zip(control_summary["target"], control_summary["retention_min"],
                       control_summary["lowest"], strict=True)
            for seed, (drawn, low, lowest) in enumerate(rows, start=1):
                print(f"|   placebo {seed} | {base[target]:.2f} -> {drawn:.2f} | "
                      f"min {low:.2f} ({lowest}) |", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
