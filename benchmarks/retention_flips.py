"""Which samples a change costs: per sample, the judge's reading of a kept concept before and
after each patch, on the leaderboard's prompts and seeds (its main entries, 32 samples, seeds
1000+). Retention min over twenty concepts at 32 samples is a count of flipped samples; this
shows whether different changes (trained patches, placebos of their size) flip the same
borderline samples of the base model or each their own.

    python benchmarks/retention_flips.py dotted,checkered,outlined \
        runs/a.safetensors runs/b.safetensors ... [--threads 1] [--n 32]

Prints one JSON line: per concept, the base model's probability of each sample and what the
judge reads as its subject (a style's prompts name none: is a lost sample the forgotten
concept's own?), the seeds each patch flips (recognised before, not after: 'lost'; the
reverse: 'gained'), and the seeds two or more patches lose ('lost_by_two_or_more').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from forget_me_not.bench.runner import build_judges
from forget_me_not.bench.suites import load_suite
from forget_me_not.evaluate import applied
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch
from forget_me_not.sampling import GenerationSettings, recognition_score
from forget_me_not.world.defaults import default_guidance, default_steps
from forget_me_not.world.scoring import read_labels


def main_entries(names: str) -> tuple[Any, list[Any]]:
    """The world suite and its main entries for the concepts named (joined by ',')."""
    suite = load_suite("world")
    wanted = names.split(",")
    entries = [e for e in suite.select(None) if e.group == "main" and e.concept.name in wanted]
    unknown = sorted(set(wanted) - {e.concept.name for e in entries})
    if unknown:
        raise SystemExit(f"not world suite concepts: {unknown}")
    return suite, entries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("concepts", help="world concepts to read, joined by ','")
    p.add_argument("patches", nargs="+", help="patch files, each scored on its own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    missing = [x for x in a.patches if not Path(x).is_file()]
    if missing:
        raise SystemExit(f"no patch file {missing[0]}: pass .safetensors patches from fmn forget")
    suite, entries = main_entries(a.concepts)
    judges = build_judges(suite, entries)
    pipe = load_pipeline("embedded")
    gen = GenerationSettings(a.n, 1000, default_steps(pipe), default_guidance(pipe), 16)

    def read(on_base: bool = False) -> dict[str, tuple[list, list, list, list[str]]]:
        """Per concept: seeds, probabilities, recognised, and (on the base model) subjects."""
        out = {}
        for e in entries:
            got = recognition_score(pipe, e.concept, judges[e.key],
                                    list(e.prompts) or e.concept.prompts(), gen,
                                    keep_images=on_base)  # images only to read the subjects
            subjects = (read_labels(judges[e.key].heads(got.images), range(len(got.images)),
                                    "object") if on_base else [])
            out[e.concept.name] = (got.seeds, got.probabilities.tolist(),
                                   got.recognised.tolist(), subjects)
        return out

    base = read(on_base=True)
    report: dict[str, dict] = {n: {"base_probability": [round(x, 3) for x in base[n][1]],
                                   "base_subject": base[n][3],
                                   "base_rate": sum(base[n][2]) / len(base[n][2]),
                                   "patches": {}} for n in base}
    for path in a.patches:
        with applied(pipe, [load_patch(path)]):
            after = read()
        for name, (seeds, _, before, _) in base.items():
            now = after[name][2]
            report[name]["patches"][Path(path).stem] = {
                "lost": [s for s, b, x in zip(seeds, before, now, strict=True) if b and not x],
                "gained": [s for s, b, x in zip(seeds, before, now, strict=True) if x and not b],
            }
    for row in report.values():
        lost = [set(v["lost"]) for v in row["patches"].values()]
        row["lost_by_two_or_more"] = sorted(s for s in set().union(*lost)
                                            if sum(s in x for x in lost) >= 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
