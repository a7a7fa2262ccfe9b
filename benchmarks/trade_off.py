"""Every patch of one target measured both ways, on one picture: the worst attack (M-Score)
against the other concepts' retention min, with the issue's bars drawn in.

Reads pairs of rows from result folders: `NAME.json` from `suite_retention.py` (retention min,
KID change) beside `NAME.attacks.json` or `NAME_attacks.json` from `patch_attacks.py` (G and
every attack), and the leaderboard's own rows (`DIR/runs/ENTRY__TARGET.json`) for the other
methods. Writes OUT.json, OUT.md and OUT.png.

    python benchmarks/trade_off.py star --out benchmarks/results/trade_off/star \
        --trials benchmarks/results/{star_retention_trials,restart_trials,parts_trials,star_parts} \
        --leaderboard benchmarks/results/leaderboard_restarts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from forget_me_not.files import write_atomic

ROBUST_M, DEFAULT_M, KEEP = 0.10, 0.20, 0.95  # the robust issue's bars


def attack_file(retention: Path) -> Path | None:
    for name in (f"{retention.stem}.attacks.json", f"{retention.stem}_attacks.json"):
        if (retention.parent / name).is_file():
            return retention.parent / name
    return None


def trial_rows(folder: Path, target: str) -> list[dict[str, Any]]:
    """The folder's patches with both a retention row and an attack row for `target`."""
    rows = []
    for f in sorted(folder.glob("*.json")):
        ret = json.loads(f.read_text())
        attacks = attack_file(f)
        if not isinstance(ret, dict) or "retention_min" not in ret or attacks is None:
            continue
        att = json.loads(attacks.read_text())
        if ret.get("target") != target or att.get("target") != target:
            continue
        rows.append({"name": f"{folder.name}/{f.stem}", "method": "fmn trial",
                     "m_score": att["m_score"], "retention_min": ret["retention_min"],
                     "kid_change": ret.get("kid_change")})
    return rows


def leaderboard_rows(folder: Path, target: str) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((folder / "runs").glob(f"*__{target}.json")):
        r = json.loads(f.read_text())
        rows.append({"name": r["entry"], "method": r["method"], "m_score": r["m_score"],
                     "retention_min": r["retention_min"], "kid_change": r.get("kid_change")})
    return rows


def verdict(row: dict[str, Any]) -> str:
    kept = row["retention_min"] >= KEEP
    if kept and row["m_score"] <= ROBUST_M:
        return "robust bar met"
    if kept and row["m_score"] <= DEFAULT_M:
        return "default bar met"
    if kept:
        return "kept, concept reachable"
    return "forgets, costs the others" if row["m_score"] <= DEFAULT_M else "neither"


def kid_text(change: float | None) -> str:
    return "-" if change is None else f"{change:+.0f}"


def plot(rows: list[dict[str, Any]], target: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.fill_between([-0.02, DEFAULT_M], KEEP, 1.01, color="#e4f4e4", zorder=0)
    ax.fill_between([-0.02, ROBUST_M], KEEP, 1.01, color="#c8eac8", zorder=0)
    ax.axhline(KEEP, color="grey", lw=0.8, ls="--")
    for m in (ROBUST_M, DEFAULT_M):
        ax.axvline(m, color="grey", lw=0.8, ls=":")
    trials = [r for r in rows if r["method"] == "fmn trial"]
    others = [r for r in rows if r["method"] != "fmn trial"]
    ax.scatter([r["m_score"] for r in trials], [r["retention_min"] for r in trials], s=18,
               color="#57a", alpha=0.6, label=f"FMN patches measured ({len(trials)})")
    ax.scatter([r["m_score"] for r in others], [r["retention_min"] for r in others], s=40,
               marker="D", color="#c53", label="leaderboard entries")
    placed: list[tuple[float, float]] = []
    for r in others:
        xy = (r["m_score"], r["retention_min"])
        # labels of points close together go one under the other
        near = sum(abs(x - xy[0]) < 0.1 and abs(y - xy[1]) < 0.02 for x, y in placed)
        placed.append(xy)
        ax.annotate(r["name"].removeprefix("conceptworld-"), xy, fontsize=7,
                    xytext=(-40 if xy[0] > 0.85 else 5, -3 - 9 * near), textcoords="offset points")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(min(0.6, min(r["retention_min"] for r in rows) - 0.03), 1.01)
    ax.set_xlabel("M-Score (G and the worst attack)")
    ax.set_ylabel("retention min (the other concepts)")
    ax.set_title(f"{target}: forgetting under attack against what the others keep")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8,
              title="green: retention >= 0.95 with M <= 20% (default bar) / 10% (robust)",
              title_fontsize=8)
    fig.tight_layout()
    write_atomic(out.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target")
    p.add_argument("--trials", nargs="+", type=Path, default=[])
    p.add_argument("--leaderboard", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="path without suffix")
    a = p.parse_args()
    missing = [d for d in [*a.trials, *([a.leaderboard] if a.leaderboard else [])]
               if not d.is_dir()]
    if missing:
        raise SystemExit(f"no folder {missing[0]}: pass result folders")
    rows = [r for d in a.trials for r in trial_rows(d, a.target)]
    if a.leaderboard:
        rows += leaderboard_rows(a.leaderboard, a.target)
    if not rows:
        raise SystemExit(f"no patch of {a.target} with both retention and attack rows there")
    for r in rows:
        r["verdict"] = verdict(r)
    rows.sort(key=lambda r: (-r["retention_min"], r["m_score"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| patch | method | M | retention min | KID change | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['method']} | {r['m_score']:.0%} | {r['retention_min']:.2f} | "
              f"{kid_text(r['kid_change'])} | {r['verdict']} |" for r in rows]
    for suffix, text in ((".json", json.dumps(rows, indent=1)), (".md", "\n".join(lines) + "\n")):
        write_atomic(a.out.with_suffix(suffix), lambda tmp, text=text: Path(tmp).write_text(text))
    plot(rows, a.target, a.out)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(json.dumps({"patches": len(rows), **counts}))


if __name__ == "__main__":
    main()
