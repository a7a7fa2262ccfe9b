"""Retention prompts with the kept concepts in every style the world trains them in.

The world's retention set (`preserve_set: conceptworld`) holds each kept concept in its plain
prompts; a concept's reference images also show it striped, dotted or checkered. This prints,
as a JSON list for `--set fmn.preserve_prompts=...`, that set plus every kept object, unsafe
object and ID "in STYLE style" for each world style, the pairs held out of the model's training
left out (the suite measures them).

    fmn forget --concept star --recipe conceptworld-robust-prune \\
        --set "fmn.preserve_prompts=$(python benchmarks/context_prompts.py star)" --out P
"""

from __future__ import annotations

import argparse
import json

from forget_me_not.world.captions import HELD_OUT
from forget_me_not.world.concepts import all_concepts, retention_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="the world concept being forgotten (left out)")
    a = p.parse_args()
    styles = [c.name for c in all_concepts() if c.kind == "style"]
    out = list(retention_prompts([a.target]))
    for c in all_concepts():
        if c.name == a.target or c.kind not in ("object", "nsfw", "id"):
            continue
        for style in styles:
            if (c.name, style) not in HELD_OUT:
                subject = c.name if c.kind == "id" else f"a {c.name}"
                out.append(f"{subject} in {style} style")
    print(json.dumps(list(dict.fromkeys(out))))


if __name__ == "__main__":
    main()
