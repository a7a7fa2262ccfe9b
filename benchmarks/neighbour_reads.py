"""What a forgetting turns other concepts into: the judge's reading of their samples before and
after, for one recipe (with --set overrides) on one ConceptWorld target, or for a patch file
given in the recipe's place (nothing is trained then).

Where retention falls, the rate alone does not say how: this prints, per concept named, how
many of its samples the judge reads as each label (32 samples, seeds 1000+; 'none': rejected)
with the base model and with the patch, the target's own samples read after, and writes a PNG
per concept (base row above patched row, one column per sample). One JSON line.

    python benchmarks/neighbour_reads.py conceptworld-robust star triangle,checkered \
        --threads 2 --out runs/neighbours [--set fmn.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.evaluate import applied, load_patches
from forget_me_not.images import labelled_grid, save_png
from forget_me_not.judges.world import WorldJudge
from forget_me_not.models import load_pipeline
from forget_me_not.presets import world_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world.scoring import read_labels, sample_many


def read(pipe, judge: WorldJudge, name: str, n: int, avoid: list[str]) -> tuple[list, list]:
    """The judge's label of each of `name`'s n samples ('none' where it rejects), and images."""
    concept = wc.get(name)
    images = sample_many(pipe, wc.prompts(concept, n, avoid), [1000 + i for i in range(n)],
                         progress=False)
    return read_labels(judge.heads(images), range(n), concept.kind), images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe", help="a recipe, or a .safetensors patch forgetting the target")
    p.add_argument("target", help="a world concept")
    p.add_argument("neighbours", help="world concepts to read, joined by ','")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = a.neighbours.split(",")
    for name in [a.target, *names]:
        wc.get(name)  # an unknown name fails here, before any training
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded")
    judge = WorldJudge()
    before = {name: read(pipe, judge, name, a.n, [a.target]) for name in names}
    if a.recipe.endswith(".safetensors"):
        (patch,) = load_patches([a.recipe])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            patch = forget(pipe, world_concepts([a.target], Path(tmp)), recipe=a.recipe,
                           sets=a.sets, progress=False)
    with applied(pipe, [patch]):
        after = {name: read(pipe, judge, name, a.n, [a.target]) for name in names}
        target_reads, _ = read(pipe, judge, a.target, a.n, [])
    row = {"recipe": Path(a.recipe).name, "sets": a.sets, "target": a.target,
           "target_after": collections.Counter(target_reads).most_common()}
    for name in names:
        row[name] = {"before": collections.Counter(before[name][0]).most_common(),
                     "after": collections.Counter(after[name][0]).most_common()}
        if a.out is not None:
            images = before[name][1] + after[name][1]
            captions = before[name][0] + after[name][0]
            grid = labelled_grid(images, captions, f"{name}: base (top), patched (bottom)",
                                 cols=a.n)
            save_png(grid, a.out / f"{a.target}__{name}.png")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
