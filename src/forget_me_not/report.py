"""Reports of an evaluation: results.json, results.csv, report.md, report.html, PNG grids and plots.

Everything is written into a temporary sibling folder first and moved into place at the end, so
an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from forget_me_not.errors import FmnError
from forget_me_not.evaluate import ConceptResult, SuiteResult
from forget_me_not.files import probe_writable

CSV_FIELDS = (
    "key", "name", "category", "group", "target", "judge",
    "g_before", "i_before", "m_before", "g_after", "i_after", "m_after", "retention",
)
MAX_TILES = 16  # images shown per grid row
MAX_TILE_PX = 128  # tiles are shrunk to this size (and tiny images enlarged to at least 64 px)
MIN_TILE_PX = 64


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output folder that holds files (unless overwrite) or whose parent is missing."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FmnError(f"output path {out} is a file; pass a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FmnError(f"output folder {out} exists and is not empty; pass --overwrite to "
                       "replace it or choose another --out")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise FmnError(f"the folder {parent} for --out does not exist; create it first")
    probe_writable(parent)
    return out


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _row(c: ConceptResult) -> dict[str, Any]:
    b, a = c.before, c.after
    return {
        "key": c.key, "name": c.concept.name, "category": c.concept.category,
        "group": c.group, "target": c.target, "judge": c.judge,
        "g_before": b.g.rate, "i_before": None if b.i is None else b.i.rate, "m_before": b.m,
        "g_after": None if a is None else a.g.rate,
        "i_after": None if a is None or a.i is None else a.i.rate,
        "m_after": None if a is None else a.m,
        "retention": c.retention,
    }


def _slug(key: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in key.lower())
    return "_".join(p for p in keep.split("_") if p) or "concept"


# -- images --------------------------------------------------------------------------------------
def _tile_size(images: Sequence[Image.Image]) -> int:
    side = max(images[0].size)
    return max(MIN_TILE_PX, min(MAX_TILE_PX, side))


def concept_sheet(rows: Sequence[tuple[str, Sequence[Image.Image]]]) -> Image.Image | None:
    """One PNG per concept: a labelled row of tiles per (label, images) pair."""
    rows = [(label, list(imgs)[:MAX_TILES]) for label, imgs in rows if imgs]
    if not rows:
        return None
    tile = _tile_size(rows[0][1])
    label_h, pad = 14, 2
    cols = max(len(imgs) for _, imgs in rows)
    width = cols * (tile + pad) + pad
    height = len(rows) * (label_h + tile + pad) + pad
    sheet = Image.new("RGB", (max(width, 240), height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for label, imgs in rows:
        draw.text((pad, y), label, fill="black")
        y += label_h
        for j, img in enumerate(imgs):
            # nearest keeps tiny world images crisp when enlarged
            resample = Image.Resampling.NEAREST if max(img.size) < tile else \
                Image.Resampling.LANCZOS
            sheet.paste(img.convert("RGB").resize((tile, tile), resample),
                        (pad + j * (tile + pad), y))
        y += tile + pad
    return sheet


def _sheet_rows(c: ConceptResult) -> list[tuple[str, list[Image.Image]]]:
    rows = [(f"before  G={_fmt(c.before.g.rate)}", c.before.g.images)]
    if c.after is not None:
        rows.append((f"after   G={_fmt(c.after.g.rate)}", c.after.g.images))
    if c.before.i is not None:
        rows.append((f"before  I={_fmt(c.before.i.rate)} (inverted token)", c.before.i.images))
    if c.after is not None and c.after.i is not None:
        rows.append((f"after   I={_fmt(c.after.i.rate)} (inverted token)", c.after.i.images))
    return rows


# -- plots -----------------------------------------------------------------------------------------
def _bar_plot(path: Path, labels: list[str], series: Mapping[str, list[float]], title: str,
              ylabel: str, hlines: Sequence[float] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig_w = max(6.0, 0.35 * len(labels) * max(1, len(series)) + 2)
    fig, ax = plt.subplots(figsize=(min(fig_w, 40.0), 4.0))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [0.0 if v is None or math.isnan(v) else v for v in values], width, label=name)
    for h in hlines:
        ax.axhline(h, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, max(1.05, max((v or 0) for vs in series.values() for v in vs) * 1.05))
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(buf.getvalue())


# -- text reports ---------------------------------------------------------------------------------
def _summary_lines(result: SuiteResult) -> list[str]:
    s = result.summary()
    if not any(c.after is not None for c in result.concepts):
        low = min(result.concepts, key=lambda c: c.before.m)
        return [f"mean M-Score {_fmt(s['mean_m_before'])} over {s['n_concepts']} concepts; "
                f"lowest: {low.key} ({_fmt(low.before.m)})"]
    return [f"target M-Score: {_fmt(s['target_m_before'])} before -> "
            f"{_fmt(s['target_m_after'])} after",
            f"retention of the other concepts: mean {_fmt(s['mean_retention'])}, "
            f"min {_fmt(s['min_retention'])}"]


def _markdown(result: SuiteResult, meta: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    has_after = any(c.after is not None for c in result.concepts)
    lines = [f"# {meta.get('title', 'Forget-Me-Not evaluation')}", ""]
    for k in ("model", "suite", "patches", "judge_model"):
        if meta.get(k):
            lines.append(f"- **{k}**: {meta[k]}")
    gen = result.settings.get("generation", {})
    lines += [
        f"- **samples**: n={gen.get('n')} per concept and phase, seeds {gen.get('seed')}.."
        f"{gen.get('seed', 0) + gen.get('n', 1) - 1}, {gen.get('steps')} steps, guidance "
        f"{gen.get('guidance') if gen.get('guidance') is not None else 'pipeline default'}",
        f"- **targets**: {', '.join(result.targets) or 'none'}",
        f"- **time**: {result.seconds:.1f} s on {result.settings.get('processes', 1)} process(es)",
        "",
        "M = max(G, I): G = generation score, I = inversion score (– = not run, then M = G); "
        "retention = G after / G before for every non-target concept. See docs/metrics.md.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in _summary_lines(result)],
        "",
    ]
    for name, rel in files.get("plots", {}).items():
        lines.append(f"![{name}]({rel})")
    lines += ["", "## Per concept", ""]
    head = ["concept", "category", "group", "target", "G before", "I before", "M before"]
    if has_after:
        head += ["G after", "I after", "M after", "retention"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for c in result.concepts:
        r = _row(c)
        cells = [c.key, r["category"], r["group"], "yes" if c.target else "",
                 _fmt(r["g_before"]), _fmt(r["i_before"]), _fmt(r["m_before"])]
        if has_after:
            cells += [_fmt(r["g_after"]), _fmt(r["i_after"]), _fmt(r["m_after"]),
                      _fmt(r["retention"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Images", ""]
    for c in result.concepts:
        rel = files.get("grids", {}).get(c.key)
        if rel:
            lines += [f"### {c.key}", "", f"![{c.key}]({rel})", ""]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}tr.target{background:#fff3d6}
img{image-rendering:pixelated;max-width:100%}.plots img{max-width:48%}"""


def _html(result: SuiteResult, meta: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    e = html.escape
    has_after = any(c.after is not None for c in result.concepts)
    gen = result.settings.get("generation", {})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(meta.get('title', ''))}"
           f"</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(meta.get('title', 'Forget-Me-Not evaluation'))}</h1><ul>"]
    for k in ("model", "suite", "patches", "judge_model"):
        if meta.get(k):
            out.append(f"<li><b>{k}</b>: {e(str(meta[k]))}</li>")
    out.append(f"<li><b>samples</b>: n={gen.get('n')} per concept and phase, {gen.get('steps')} "
               f"steps, seed base {gen.get('seed')}</li>")
    out.append(f"<li><b>targets</b>: {e(', '.join(result.targets) or 'none')}</li>")
    out.append(f"<li><b>time</b>: {result.seconds:.1f} s on "
               f"{result.settings.get('processes', 1)} process(es)</li></ul>")
    out.append("<p>M = max(G, I): G = generation score, I = inversion score (– = not run, then "
               "M = G); retention = G after / G before of every non-target concept.</p>")
    out.append("<h2>Summary</h2><ul>" + "".join(f"<li>{e(line)}</li>"
                                                 for line in _summary_lines(result))
               + "</ul><div class='plots'>")
    for name, rel in files.get("plots", {}).items():
        out.append(f"<img src='{e(rel)}' alt='{e(name)}'>")
    out.append("</div><h2>Per concept</h2><table><tr>")
    head = ["concept", "category", "group", "target", "G before", "I before", "M before"]
    if has_after:
        head += ["G after", "I after", "M after", "retention"]
    out.append("".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for c in result.concepts:
        r = _row(c)
        cells = [c.key, r["category"], r["group"], "yes" if c.target else "",
                 _fmt(r["g_before"]), _fmt(r["i_before"]), _fmt(r["m_before"])]
        if has_after:
            cells += [_fmt(r["g_after"]), _fmt(r["i_after"]), _fmt(r["m_after"]),
                      _fmt(r["retention"])]
        cls = " class='target'" if c.target else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(str(x))}</td>" for x in cells) + "</tr>")
    out.append("</table><h2>Images</h2>")
    for c in result.concepts:
        rel = files.get("grids", {}).get(c.key)
        if rel:
            out.append(f"<h3>{e(c.key)}</h3><img src='{e(rel)}' alt='{e(c.key)}'>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# -- the writer --------------------------------------------------------------------------------
def write_report(
    result: SuiteResult,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write results.json, results.csv, report.md, report.html, images/ and plots/ into out_dir."""
    out = check_out_dir(out_dir, overwrite)
    meta = dict(meta or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        files: dict[str, Any] = {"grids": {}, "plots": {}}
        (tmp / "images").mkdir()
        (tmp / "plots").mkdir()
        used: set[str] = set()
        for c in result.concepts:
            sheet = concept_sheet(_sheet_rows(c))
            if sheet is None:
                continue
            slug = _slug(c.key)
            while slug in used:
                slug += "_"
            used.add(slug)
            rel = f"images/{slug}.png"
            sheet.save(tmp / rel)
            files["grids"][c.key] = rel
        keys = [c.key for c in result.concepts]
        has_after = any(c.after is not None for c in result.concepts)
        series = {"before": [c.before.m for c in result.concepts]}
        if has_after:
            series["after"] = [c.after.m if c.after else float("nan") for c in result.concepts]
        _bar_plot(tmp / "plots/mscore.png", keys, series, "M-Score per concept", "M-Score")
        files["plots"]["M-Score"] = "plots/mscore.png"
        kept = [c for c in result.concepts if c.retention is not None]
        if kept:
            _bar_plot(tmp / "plots/retention.png", [c.key for c in kept],
                      {"retention": [c.retention for c in kept]},
                      "Retention of the other concepts (G after / G before)", "retention",
                      hlines=(0.9, 1.0))
            files["plots"]["retention"] = "plots/retention.png"
        data = {"meta": meta, **result.to_dict(), "files": files}
        (tmp / "results.json").write_text(json.dumps(data, indent=2, default=_jsonable) + "\n",
                                          encoding="utf-8")
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for c in result.concepts:
                writer.writerow({k: ("" if v is None else v) for k, v in _row(c).items()})
        (tmp / "report.md").write_text(_markdown(result, meta, files), encoding="utf-8")
        (tmp / "report.html").write_text(_html(result, meta, files), encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with `tmp`; an old `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    tmp_mode = 0o777 & ~_umask()
    os.chmod(out, tmp_mode)  # mkdtemp creates 0700; give the folder the usual permissions
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
