"""What the judge reads in the samples a patch costs: for each kept concept's sample recognised
on the base model and not after the patch (the leaderboard's prompts and seeds: main entries,
32 samples, seeds 1000+), the patched sample's reading on the concept's own head with the
reject head set aside, and the reject head's probability. Tells a sample drawn as another
concept from one the reject head turns away while the concept's head still reads it.

    python benchmarks/lost_reads.py dotted,square,triangle PATCH.safetensors --threads 1 \
        --out DIR

Writes DIR/lost_reads.json and DIR/lost_reads.png (per lost sample: base above, patched below).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from judge_choice import add_judge_option, chosen_judge
from PIL import Image, ImageDraw
from retention_flips import main_entries

from forget_me_not.bench.runner import build_judges
from forget_me_not.evaluate import applied
from forget_me_not.files import write_atomic
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch
from forget_me_not.sampling import GenerationSettings, recognition_score, sample_plan
from forget_me_not.world import concepts as wc
from forget_me_not.world.defaults import default_guidance, default_steps
from forget_me_not.world.judge_model import HEADS
from forget_me_not.world.scoring import HEAD_OF_KIND


def reading(heads: dict, i: int, head: str) -> dict:
    """The head's label and the reject head's probability of sample i."""
    return {"read": HEADS[head][int(heads[head][i].argmax())],
            "reject_p": round(float(heads["reject"][i][1]), 3)}


def sheet(pairs: list[tuple[str, Image.Image, Image.Image]], scale: int = 4) -> Image.Image:
    """Base above, patched below, one column per lost sample, its caption on top."""
    size = 32 * scale
    out = Image.new("RGB", (max(1, len(pairs)) * size, 2 * size + 28), "white")
    draw = ImageDraw.Draw(out)
    for k, (caption, before, after) in enumerate(pairs):
        out.paste(before.resize((size, size), Image.Resampling.NEAREST), (k * size, 28))
        out.paste(after.resize((size, size), Image.Resampling.NEAREST), (k * size, 28 + size))
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((k * size + 2, 2 + 12 * j), line, fill="black")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("concepts", help="world concepts to read, joined by ','")
    p.add_argument("patch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True)
    add_judge_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    judge = chosen_judge(a.judge)
    if not Path(a.patch).is_file():
        raise SystemExit(f"no patch file {a.patch}: pass a .safetensors patch from fmn forget")
    suite, entries = main_entries(a.concepts)
    judges = build_judges(suite, entries, judge=judge)
    pipe = load_pipeline("embedded")
    gen = GenerationSettings(a.n, 1000, default_steps(pipe), default_guidance(pipe), 16)

    def samples() -> dict:
        return {e.key: recognition_score(pipe, e.concept, judges[e.key],
                                         list(e.prompts) or e.concept.prompts(), gen,
                                         keep_images=True) for e in entries}

    before = samples()
    with applied(pipe, [load_patch(a.patch)]):
        after = samples()
    report, pairs = {}, []
    for e in entries:
        head = HEAD_OF_KIND[wc.get(e.concept.name).kind]
        prompts, _ = sample_plan(list(e.prompts) or e.concept.prompts(), a.n, 1000)
        b, x = before[e.key], after[e.key]
        hb, hx = judges[e.key].heads(b.images), judges[e.key].heads(x.images)
        lost = []
        for i, seed in enumerate(b.seeds):
            if b.recognised[i] and not x.recognised[i]:
                row = {"seed": seed, "prompt": prompts[i], "base": reading(hb, i, head),
                       "patched": reading(hx, i, head)}
                lost.append(row)
                pairs.append((f"{e.concept.name} {seed}\n{row['patched']['read']} "
                              f"rej {row['patched']['reject_p']:.2f}", b.images[i], x.images[i]))
        report[e.concept.name] = {"lost": lost, "rate_before": float(b.recognised.mean()),
                                  "rate_after": float(x.recognised.mean())}
    lost_all = [r for v in report.values() for r in v["lost"]]
    report["summary"] = {
        "lost": len(lost_all),
        "rejected, own head still reads it": sum(
            r["patched"]["reject_p"] >= 0.5 and r["patched"]["read"] == name
            for name, v in report.items() if name != "summary" for r in v["lost"]),
        "read as something else": sum(r["patched"]["read"] != name for name, v in report.items()
                                      if name != "summary" for r in v["lost"]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    write_atomic(out / "lost_reads.json", lambda f: Path(f).write_text(text))
    image = sheet(pairs)
    write_atomic(out / "lost_reads.png", lambda f: image.save(f, format="PNG"))
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
