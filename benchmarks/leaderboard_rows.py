"""The leaderboard of whatever runs a comparison has finished so far, without training more:
reads DIR/runs/*.json, ranks them as `fmn bench --compare` does and writes the leaderboard
files into DIR (a comparison still running, or interrupted, is left as it is).

    python benchmarks/leaderboard_rows.py runs/leaderboard32 --n 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from forget_me_not.bench.compare import KEEP
from forget_me_not.bench.leaderboard import rank, write_leaderboard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--budget", type=int, default=150)
    a = p.parse_args()
    rows = [json.loads(f.read_text()) for f in sorted((a.folder / "runs").glob("*.json"))]
    order = ["star", "tavi", "outlined", "skull+gun", "circle+square+triangle+heart"]
    rows.sort(key=lambda r: order.index(r["target"]) if r["target"] in order else len(order))
    ranked = rank(rows, KEEP)
    write_leaderboard(ranked, a.folder, {"suite": "world", "model": "embedded", "n": a.n,
                                         "seed": a.seed, "budget": a.budget, "keep": KEEP})
    print((a.folder / "leaderboard.md").read_text())


if __name__ == "__main__":
    main()
