"""The leaderboard of a comparison: ranked rows as JSON, CSV, Markdown, HTML and one PNG plot."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forget_me_not.files import write_atomic

# A target counts as forgotten at an M-Score this low (the robust issue's bar for the default);
# with retention kept as well it is "met": a forgetting that costs little.
FORGOTTEN = 0.2

COLUMNS = (
    ("entry", "entry"), ("method", "method"), ("target", "target"), ("g_before", "G before"),
    ("g_after", "G after"), ("i_after", "I after"), ("e_after", "E after"),
    ("p_after", "P after"), ("a_after", "A after"), ("m_score", "M-Score"),
    ("retention_min", "retention min"), ("retention_mean", "retention mean"),
    ("below", "below 0.9"), ("kid_change", "KID change"), ("kid_spread", "KID spread"),
    ("kid_worst", "KID worst"), ("forget_seconds", "forget s"), ("peak_mb", "peak MB"),
    ("patch_bytes", "patch bytes"),
)
# With `--placebo`: the retention a random change of the patch's size per layer leaves.
PLACEBO = ("placebo_retention_min", "placebo retention min")


def columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The table's columns: the placebo's retention beside the patch's where it was measured."""
    if not any(row.get(PLACEBO[0]) is not None for row in rows):
        return COLUMNS
    at = [k for k, _ in COLUMNS].index("retention_mean") + 1
    return (*COLUMNS[:at], PLACEBO, *COLUMNS[at:])


def met(row: dict[str, Any], keep: float) -> bool:
    """Forgotten (M-Score <= FORGOTTEN) with every other concept kept (retention min >= keep):
    keeping everything by forgetting nothing is not a result, nor is forgetting at any cost."""
    return row["m_score"] <= FORGOTTEN and (row["retention_min"] or 0.0) >= keep


def rank(rows: Sequence[dict[str, Any]], keep: float) -> list[dict[str, Any]]:
    """Per target: entries that meet both bars (`met`) first, then the lowest M-Score, then
    the highest retention; `rank` is the place within the target."""
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        group = [dict(r) for r in rows if r["target"] == target]
        group.sort(key=lambda r: (not met(r, keep), r["m_score"], -(r["retention_min"] or 0)))
        for place, row in enumerate(group, 1):
            row["rank"] = place
        out += group
    return out


def overall(rows: Sequence[dict[str, Any]], keep: float) -> list[dict[str, Any]]:
    """Per entry over its targets: mean and worst M-Score, worst retention min, how many
    targets keep every other concept >= `keep` and how many meet both bars (`met`); ordered as
    the default is chosen: entries that remove the concept from the UNet first, then the most
    targets met, then the lowest mean M-Score. An entry with fewer targets than the others (a
    comparison still running) comes after the complete ones: its mean is over other targets."""
    from forget_me_not import methods

    out = []
    for entry in dict.fromkeys(r["entry"] for r in rows):
        mine = [r for r in rows if r["entry"] == entry]
        scores = [r["m_score"] for r in mine]
        kept = [r["retention_min"] or 0.0 for r in mine]
        # an entry may use another method per target (a recipe by kind of concept)
        used = list(dict.fromkeys(str(r["method"]) for r in mine))
        parts = {m for name in used for m in name.split("+")}
        out.append({
            "entry": entry, "method": " / ".join(used), "targets": len(mine),
            "m_mean": sum(scores) / len(scores), "m_worst": max(scores),
            "retention_worst": min(kept), "kept_targets": sum(k >= keep for k in kept),
            "met_targets": sum(met(r, keep) for r in mine),
            "removes": all(m not in methods.names() or methods.get(m).removes_from_unet
                           for m in parts)})
    most = max((o["targets"] for o in out), default=0)
    out.sort(key=lambda o: (not o["removes"], o["targets"] < most, -o["met_targets"],
                            o["m_mean"]))
    return out


def choice(summary: Sequence[dict[str, Any]], keep: float) -> str:
    """The default rule in one sentence, with the entry it picks."""
    most = max((o["targets"] for o in summary), default=0)
    removing = [o for o in summary if o["removes"] and o["targets"] == most]
    if not removing:
        return "No entry removes the concept from the UNet."
    first = removing[0]
    bars = f"M-Score <= {FORGOTTEN:.0%} and retention min >= {keep}"
    if first["met_targets"] == first["targets"]:
        return (f"Choice: {first['entry']} (lowest mean M-Score {first['m_mean']:.0%} among the "
                f"entries that remove the concept from the UNet with {bars} on every target).")
    return (f"No entry that removes the concept from the UNet has {bars} on every target; "
            f"the most targets met, then the lowest mean M-Score: {first['entry']} "
            f"({first['met_targets']} of {first['targets']} met, mean M {first['m_mean']:.0%}, "
            f"worst retention min {first['retention_worst']:.2f}).")


def overall_markdown(summary: Sequence[dict[str, Any]], keep: float) -> list[str]:
    lines = ["", f"## Over all targets (kept: retention min >= {keep}; met: kept and M-Score "
             f"<= {FORGOTTEN:.0%})", "",
             "| entry | method | removes from UNet | targets | mean M | worst M | "
             "worst retention min | targets kept | targets met |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {o['entry']} | {o['method']} | {'yes' if o['removes'] else 'no (hides)'} | "
              f"{o['targets']} | {o['m_mean']:.0%} | {o['m_worst']:.0%} | "
              f"{o['retention_worst']:.2f} | {o['kept_targets']} | {o['met_targets']} |"
              for o in summary]
    return [*lines, "", choice(summary, keep)]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "below":
        return ", ".join(value) or "-"
    if key in ("g_before", "g_after", "i_after", "e_after", "p_after", "a_after", "m_score"):
        return f"{100 * value:.0f}%"
    if key in ("kid_change", "kid_spread"):
        return f"{value:+.3f}" if key == "kid_change" else f"{value:.3f}"
    if "retention" in key:  # the patch's and its placebo's
        return f"{value:.2f}"
    if key in ("forget_seconds", "peak_mb"):
        return f"{value:.1f}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    shown = columns(rows)
    head = "| rank | " + " | ".join(label for _, label in shown) + " |"
    lines = [f"# Leaderboard: suite {info.get('suite')}, {info.get('n')} samples per concept, "
             f"seed {info.get('seed')}, inversion budget {info.get('budget')}", "",
             f"Ranked per target: M-Score <= {FORGOTTEN:.0%} with retention min >= "
             f"{info.get('keep')} first, then the lowest M-Score = max(G, I, E, P, A): G the "
             "prompts, I textual inversion, E the base text encoder with the patched UNet, P "
             "unseen paraphrases, A the adversarial prompt "
             "search. KID change: the largest growth of an other concept's KID to fresh renders "
             "(judge features), beside the base model's run-to-run spread.", "", head,
             "|" + "---|" * (len(shown) + 1)]
    for row in rows:
        cells = [str(row["rank"])] + [_cell(k, row.get(k)) for k, _ in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += overall_markdown(overall(rows, info.get("keep", 0.95)), info.get("keep", 0.95))
    return "\n".join(lines) + "\n"


def plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Two grids, entries (best mean M first) by targets: the M-Score and retention min, each
    cell written out, so a table of many entries and targets still reads at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [o["entry"] for o in overall(rows, 0.95)]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    cell = {(r["entry"], r["target"]): r for r in rows}
    width = max(8.0, 2.4 * len(targets) + 3.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, 1.2 + 0.38 * len(entries)), dpi=100,
                             sharey=True)
    # Retention's colours span 0.5-1: the bar is 0.95, and 0.7 is already a visible loss.
    panels = (("m_score", "M-Score (lower: forgotten)", "RdYlGn_r", 0.0, "{:.0%}"),
              ("retention_min", "retention min (higher: kept)", "RdYlGn", 0.5, "{:.2f}"))
    for ax, (key, title, cmap, low, fmt) in zip(axes, panels, strict=True):
        grid = [[float("nan") if (e, t) not in cell or cell[e, t].get(key) is None
                 else float(cell[e, t][key]) for t in targets] for e in entries]
        ax.imshow(grid, cmap=cmap, vmin=low, vmax=1.0, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if value == value:  # not NaN: the entry ran on this target
                    ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(targets)), [t.replace("+", "+\n") for t in targets],
                      fontsize=7)
        ax.set_yticks(range(len(entries)), entries, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def html_page(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    shown = columns(rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in shown)
    body = "".join(
        "<tr><td>" + str(r["rank"]) + "</td>"
        + "".join(f"<td>{html.escape(_cell(k, r.get(k)))}</td>" for k, _ in shown) + "</tr>"
        for r in rows)
    keep = info.get("keep", 0.95)
    summary = overall(rows, keep)
    over = "".join(
        f"<tr><td>{html.escape(o['entry'])}</td><td>{html.escape(str(o['method']))}</td>"
        f"<td>{'yes' if o['removes'] else 'no (hides)'}</td><td>{o['targets']}</td>"
        f"<td>{o['m_mean']:.0%}</td><td>{o['m_worst']:.0%}</td>"
        f"<td>{o['retention_worst']:.2f}</td><td>{o['kept_targets']}</td>"
        f"<td>{o['met_targets']}</td></tr>" for o in summary)
    title = html.escape(f"Leaderboard: {info.get('suite')} ({info.get('n')} samples)")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}</style></head><body>"
            f"<h1>{title}</h1><p>Ranked per target: M-Score &le; {FORGOTTEN:.0%} with retention "
            f"min &ge; {info.get('keep')} first, then the lowest M-Score = max(G, I, E, P, A)."
            "</p><img src='leaderboard.png' "
            f"alt='M-Score and retention per entry'><table><tr><th>rank</th>{head}</tr>{body}"
            "</table><h2>Over all targets</h2><table><tr><th>entry</th><th>method</th>"
            "<th>removes from UNet</th><th>targets</th><th>mean M</th><th>worst M</th>"
            f"<th>worst retention min</th><th>targets kept</th><th>targets met</th></tr>{over}"
            "</table>"
            f"<p>{html.escape(choice(summary, keep))}</p></body></html>\n")


def write_leaderboard(rows: Sequence[dict[str, Any]], out: Path, info: dict[str, Any]) -> None:
    """Every file through a temp file and a rename: no half-written leaderboard."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    shown = columns(rows)
    writer.writerow(["rank", *(k for k, _ in shown)])
    for r in rows:
        writer.writerow([r["rank"], *(";".join(r[k]) if k == "below" else r.get(k)
                                      for k, _ in shown)])
    files = {
        "leaderboard.json": json.dumps({"info": info, "rows": list(rows), "overall": overall(
            rows, info.get("keep", 0.95))}, indent=1).encode(),
        "leaderboard.csv": buffer.getvalue().encode(),
        "leaderboard.md": markdown(rows, info).encode(),
        "leaderboard.png": plot_png(rows),
        "leaderboard.html": html_page(rows, info).encode(),
    }
    for name, data in files.items():
        write_atomic(out / name, lambda tmp, data=data: Path(tmp).write_bytes(data), "file")
