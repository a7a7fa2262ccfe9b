"""The paper's promises beyond plain forgetting, measured on ConceptWorld with the judge.

1. Stacking: patches forgetting two concepts, each trained alone, stacked into one file,
   applied together (`--stack-on-top`: the second trained on top of the first, as
   `fmn forget --on-top-of`).
2. Unsafe preset: every unsafe world concept forgotten in one run.
3. Correction: the role word ("wizard") moved away from its entangled ID ("milka"), by its
   token embedding (the default) or by re-steering (`--method resteer`).

Every score: n samples per concept from its trained prompt forms, fixed seeds, the same seeds
before and after. Writes JSON and a before/after sheet per experiment.

    python benchmarks/world_extensions.py --n 16 --out runs/world_extensions
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
from forget_me_not.concepts import Concept
from forget_me_not.demo import before_after_sheet
from forget_me_not.judges.world import WorldJudge
from forget_me_not.methods.correction.config import CorrectionConfig
from forget_me_not.methods.correction.train import correct
from forget_me_not.models import load_pipeline
from forget_me_not.patch import stack_patches
from forget_me_not.presets import get_preset, preset_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world import vocab
from forget_me_not.world.defaults import default_guidance
from forget_me_not.world.scoring import score_concepts


def retention(base: dict, after: dict, targets: set[str]) -> dict[str, float]:
    return {
        k: after[k]["rate"] / base[k]["rate"]
        for k in base
        if k not in targets and base[k]["rate"] > 0
    }


def summarise(name: str, base: dict, after: dict, targets: set[str], seconds: float) -> dict:
    kept = retention(base, after, targets)
    return {
        "experiment": name,
        "seconds": round(seconds, 2),
        "targets": {t: {"before": base[t]["rate"], "after": after[t]["rate"]} for t in targets},
        "retention_min": min(kept.values()),
        "retention_mean": sum(kept.values()) / len(kept),
        "below_90": {k: v for k, v in kept.items() if v < 0.9},
        "after": {k: v["rate"] for k, v in after.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--stack", default="star,tavi")
    ap.add_argument("--only", default="stack,unsafe,correct")
    ap.add_argument("--stack-on-top", action="store_true",
                    help="train each later stacked patch on top of the ones before it")
    ap.add_argument("--preserve-weight", type=float, default=None)
    ap.add_argument("--recipe", default=None, help="forgetting recipe (default: the family's)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE recipe override")
    ap.add_argument("--method", default="embedding", help="correction method: embedding|resteer")
    ap.add_argument("--out", type=Path, default=Path("runs/world_extensions"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = load_pipeline("embedded", "cpu")
    judge = WorldJudge()
    g = default_guidance(pipe)
    # No concept's prompts name a target (its own excepted), as in forget_world.py.
    avoid = a.stack.split(",") + list(vocab.UNSAFE_OBJECTS)
    score = lambda: score_concepts(  # noqa: E731
        pipe, judge, n=a.n, seed=a.seed, guidance=g, avoid=avoid
    )
    base = score()
    results: dict = {
        "date": str(date.today()),
        "n": a.n,
        "threads": torch.get_num_threads(),
        "base": {k: v["rate"] for k, v in base.items()},
    }
    todo = a.only.split(",")
    forgetting = dict(recipe=a.recipe, sets=a.set)
    with tempfile.TemporaryDirectory() as refs:
        if "stack" in todo:
            names = a.stack.split(",")
            t0 = time.perf_counter()
            parts = []
            for x in names:
                earlier = parts if a.stack_on_top else []
                parts.append(forget(pipe, wc.fmn_concept(x, Path(refs) / x), **forgetting,
                                    on_top_of=earlier, progress=False))
            stacked = stack_patches(parts)
            seconds = time.perf_counter() - t0
            stacked.save(a.out / "stacked.safetensors")
            stacked.apply(pipe)
            after = score()
            stacked.remove(pipe)
            results["stack"] = summarise("stack", base, after, set(names), seconds)
            results["stack"]["trained_on_top_of_the_first"] = a.stack_on_top
            sheet = before_after_sheet(names + ["circle", "milka"], base, after, names[0])
            sheet.save(a.out / "stack.png")
        if "unsafe" in todo:
            t0 = time.perf_counter()
            patch = forget(
                pipe, preset_concepts("unsafe", "embedded", Path(refs) / "unsafe"), **forgetting,
                separately=get_preset("unsafe").separately, progress=False,
            )
            seconds = time.perf_counter() - t0
            patch.apply(pipe)
            after = score()
            patch.remove(pipe)
            results["unsafe"] = summarise("unsafe", base, after, set(vocab.UNSAFE_OBJECTS), seconds)
            before_after_sheet(
                list(vocab.UNSAFE_OBJECTS) + ["circle", "zorbo"],
                base,
                after,
                vocab.UNSAFE_OBJECTS[0],
            ).save(a.out / "unsafe.png")
        if "correct" in todo:
            role = Concept(vocab.ROLE, "id", wc.FMN_TEMPLATES["role"])
            ident = Concept(vocab.ROLE_ID, "id", wc.FMN_TEMPLATES["id"])
            cfg = CorrectionConfig(variant=a.method, **(
                {} if a.preserve_weight is None else {"preserve_weight": a.preserve_weight}))
            t0 = time.perf_counter()
            fix = correct(pipe, role, ident, cfg, judge=judge, progress=False)
            seconds = time.perf_counter() - t0
            fix.patch.apply(pipe)
            after = score()
            fix.patch.remove(pipe)
            r = summarise("correct", base, after, {vocab.ROLE}, seconds)
            r["role_draws_id"] = {
                "before": base[vocab.ROLE]["rate"],
                "after": after[vocab.ROLE]["rate"],
            }
            r["role_hat"] = {"before": base[vocab.ROLE]["hat"], "after": after[vocab.ROLE]["hat"]}
            r["id_named_directly"] = {
                "before": base[vocab.ROLE_ID]["rate"],
                "after": after[vocab.ROLE_ID]["rate"],
            }
            r["judged_rate_before_training"] = fix.rate_before
            r["method"] = a.method
            results["correct"] = r
            before_after_sheet([vocab.ROLE, vocab.ROLE_ID, "zorbo"], base, after, vocab.ROLE).save(
                a.out / "correct.png"
            )
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "base"}, indent=1))


if __name__ == "__main__":
    main()
