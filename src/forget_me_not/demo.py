"""The main job on the embedded model: forget one ConceptWorld concept and show the effect.

Scores the target and a few other concepts with the world judge before and after, writes the
patch, a before/after sheet (PNG) with the judge's rates, and the numbers (JSON).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from forget_me_not.files import write_atomic
from forget_me_not.images import labelled_grid, save_png

DEFAULT_OTHERS = ("circle", "heart", "milka", "zorbo", "striped", "dotted", "red")


def run_demo(
    out_dir: Path,
    target: str = "star",
    others: tuple[str, ...] = DEFAULT_OTHERS,
    n: int = 8,
    seed: int = 1000,
) -> dict:
    from forget_me_not.api import forget
    from forget_me_not.judges.world import WorldJudge
    from forget_me_not.models import load_pipeline
    from forget_me_not.world import concepts as wc
    from forget_me_not.world.defaults import default_guidance
    from forget_me_not.world.scoring import score_concepts

    names = [target] + [o for o in others if o != target]
    for name in names:
        wc.get(name)  # unknown names fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded", "cpu")
    judge = WorldJudge()
    guidance = default_guidance(pipe)
    # the others' prompts never name the target: a forgotten star must not count against "red"
    before = score_concepts(pipe, judge, names, n=n, seed=seed, guidance=guidance, avoid=[target])
    with tempfile.TemporaryDirectory() as refs:
        started = time.perf_counter()
        patch = forget(pipe, wc.fmn_concept(target, refs))
        seconds = time.perf_counter() - started
    patch_path = out_dir / f"forget-{target}.safetensors"
    patch.save(patch_path)
    patch.apply(pipe)
    after = score_concepts(pipe, judge, names, n=n, seed=seed, guidance=guidance, avoid=[target])
    patch.remove(pipe)

    summary = {
        "target": target,
        "forget_seconds": round(seconds, 2),
        "patch": patch_path.name,
        "samples_per_concept": n,
        "seed": seed,
        "guidance": guidance,
        "scores": {k: {"before": before[k]["rate"], "after": after[k]["rate"]} for k in names},
    }
    sheet = before_after_sheet(names, before, after, target)
    save_png(sheet, out_dir / "before_after.png")
    text = json.dumps(summary, indent=1)
    write_atomic(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text), "summary")
    return summary


def before_after_sheet(names: list[str], before: dict, after: dict, target: str) -> Image.Image:
    """Rows of concepts; left half before, right half after, rates in the first caption."""
    cells, captions = [], []
    for name in names:
        b, a = before[name], after[name]
        k = len(b["images"])
        tag = "TARGET " if name == target else ""
        cells += b["images"] + a["images"]
        captions += [f"{tag}{name} before {b['rate']:.0%}"] + [""] * (k - 1)
        captions += [f"after {a['rate']:.0%}"] + [""] * (k - 1)
    return labelled_grid(
        cells,
        captions,
        cols=2 * len(before[names[0]]["images"]),
        title=f"Forgetting '{target}': before (left) | after (right); "
        "% = share the judge reads as the concept",
    )
