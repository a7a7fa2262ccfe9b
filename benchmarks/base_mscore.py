"""The base model's M-Score on every concept of the world suite with every attack that applies to a
model without patches (inversion, paraphrases, adversarial search; the base encoder attack is G
itself there): what "Base model under attack" in BENCHMARKS.md was measured with.

Each concept is `fmn attack --concept C --attack inversion --attack prompts --attack
adversarial --n 32 --seed 1000 --budget 150 --out DIR/C` on one loaded pipeline; a concept
whose attack.json exists is skipped, so an interrupted run resumes. Writes DIR/base_mscore.json
and DIR/base_mscore.md (one row per concept, lowest M first).

    python benchmarks/base_mscore.py runs/base_mscore --threads 1

`--model FOLDER` scores another world pipeline the same way, e.g. the retrained reference
(`benchmarks/retrained_reference.py`: the model trained again without a concept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from forget_me_not.bench.suites import load_suite
from forget_me_not.cli.attack import prepare, run
from forget_me_not.files import write_atomic
from forget_me_not.models import load_pipeline

ATTACKS = ["inversion", "prompts", "adversarial"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--budget", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concepts", help="comma-separated (default: every world concept)")
    p.add_argument("--model", default="embedded", help="a world pipeline folder")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    suite = [e.concept.name for e in load_suite("world").select(None) if e.group == "main"]
    names = a.concepts.split(",") if a.concepts else suite
    a.out.mkdir(parents=True, exist_ok=True)
    pipe = None
    for name in names:
        if (a.out / name / "attack.json").is_file():
            continue
        plan = prepare(name, a.model, None, ATTACKS, n=a.n, seed=a.seed, budget=a.budget,
                       out=a.out / name, overwrite=True)
        pipe = pipe or load_pipeline(a.model)
        run(pipe, plan)
    rows = []
    for name in names:
        data = json.loads((a.out / name / "attack.json").read_text())
        rows.append({"concept": name, "g": data["g"], "m_score": data["m_score"],
                     **{k: v["rate"] for k, v in data["attacks"].items()}})
    rows.sort(key=lambda r: r["m_score"])
    text = json.dumps(rows, indent=1)
    write_atomic(a.out / "base_mscore.json", lambda tmp: Path(tmp).write_text(text))
    lines = ["| concept | G | I | P | A | M |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['g']:.0%} | {r['inversion']:.0%} | {r['prompts']:.0%} | "
              f"{r['adversarial']:.0%} | {r['m_score']:.0%} |" for r in rows]
    table = "\n".join(lines) + "\n"
    write_atomic(a.out / "base_mscore.md", lambda tmp: Path(tmp).write_text(table))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
