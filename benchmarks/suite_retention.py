"""A patch's G, retention and image-quality change on the world suite, without attacks: the
leaderboard's own measure (its main entries and templates, 32 samples, seeds 1000+, KID on the
judge's features against the same references), in a few minutes per patch. The base model's
rates and distances are computed once and kept in --cache.

    python benchmarks/suite_retention.py PATCH.safetensors tavi [--threads 2]
        [--n 64 --seed 1000 --cache runs/base_n64.json]   # more samples: a less noisy reading
        [--judge JUDGE.safetensors --cache runs/base_judge.json]   # another world judge

Prints one JSON line: the target's G, the lowest retentions, the mean, the KID change and the
concept it is worst for. Scored at the leaderboard's thread count (2), it gives the
leaderboard's figures for the same patch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from judge_choice import add_judge_option, chosen_judge, judge_digest

from forget_me_not import quality
from forget_me_not.bench.runner import build_judges
from forget_me_not.bench.suites import load_suite
from forget_me_not.evaluate import applied
from forget_me_not.files import write_atomic
from forget_me_not.models import load_pipeline
from forget_me_not.patch import load_patch
from forget_me_not.sampling import GenerationSettings, recognition_score
from forget_me_not.world.defaults import default_guidance, default_steps

# Caches written before they recorded their judge were all read by the judge shipped then.
SHIPPED_BEFORE_DIGEST = "9b80422816cba8e8"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("patches", help="patch files, comma-separated (applied together)")
    p.add_argument("target", help="the concept the patches forget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="runs/suite_retention_base.json")
    p.add_argument("--n", type=int, default=32, help="samples per concept (the leaderboard: 32)")
    p.add_argument("--seed", type=int, default=1000, help="first sample seed (leaderboard: 1000)")
    add_judge_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    judge_net = chosen_judge(a.judge)
    suite = load_suite("world")
    entries = [e for e in suite.select(None) if e.group == "main"]
    if a.target not in {e.concept.name for e in entries}:
        raise SystemExit(f"'{a.target}' is not a world suite concept")
    missing = [x for x in a.patches.split(",") if not Path(x).is_file()]
    if missing:
        raise SystemExit(f"no patch file {missing[0]}: pass .safetensors patches from fmn forget")
    cache = Path(a.cache)
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is not None and cached.get("threads") != a.threads:
        # another thread count rounds differently: the samples before and after would not pair
        raise SystemExit(f"{cache} was scored with {cached.get('threads')} threads: pass "
                         f"--threads {cached.get('threads')} or another --cache")
    if cached is not None and (cached.get("n", 32), cached.get("seed", 1000)) != (a.n, a.seed):
        raise SystemExit(f"{cache} holds {cached.get('n', 32)} samples from seed "
                         f"{cached.get('seed', 1000)}: pass those or another --cache")
    # The base rates are only comparable when the same judge read them.
    digest = judge_digest(a.judge)
    if cached is not None and cached.get("judge", SHIPPED_BEFORE_DIGEST) != digest:
        raise SystemExit(f"{cache} was read by another judge: pass another --cache")
    patches = [load_patch(x) for x in a.patches.split(",")]
    judges = build_judges(suite, entries, judge=judge_net)
    pipe = load_pipeline("embedded")
    gen = GenerationSettings(a.n, a.seed, default_steps(pipe), default_guidance(pipe), 16)
    refs = quality.references([e.concept.name for e in entries], 32)  # as the leaderboard
    judge = next(iter(judges.values()))

    def score() -> tuple[dict[str, float], dict[str, float]]:
        got = {e.key: recognition_score(pipe, e.concept, judges[e.key],
                                        list(e.prompts) or e.concept.prompts(), gen)
               for e in entries}
        kid = quality.distances(judge, {e.concept.name: got[e.key].images for e in entries},
                                refs)
        return {k: v.rate for k, v in got.items()}, kid

    if cached is not None:
        base = cached
    else:
        rates, kid = score()
        base = {"rates": rates, "kid": kid, "threads": a.threads, "n": a.n, "seed": a.seed,
                "judge": digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(base)
        write_atomic(cache, lambda tmp: Path(tmp).write_text(text))
    with applied(pipe, patches):
        rates, kid = score()
    kept = {k: rates[k] / base["rates"][k] for k in rates
            if k != a.target and base["rates"][k] > 0}
    low = sorted(kept.items(), key=lambda kv: kv[1])[:5]
    worst, grown = quality.worst_change(kid, base["kid"], skip=[a.target])
    print(json.dumps({"patches": a.patches, "target": a.target, "G": rates[a.target],
                      "retention_min": round(low[0][1], 4),
                      "retention_mean": round(sum(kept.values()) / len(kept), 4),
                      "lowest": [(k, round(v, 3)) for k, v in low],
                      "kid_change": round(grown, 1), "kid_worst": worst}))


if __name__ == "__main__":
    main()
