"""Every chosen attack on one concept, with G, as one M-Score: what `fmn attack` prints and
writes (attack.json, a PNG sheet of each attack's samples)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forget_me_not.attacks.base import AttackSettings


def attack_all(pipe: Any, patches: Sequence[Any], concept: Any, judge: Any,
               names: Sequence[str], settings: AttackSettings, *, progress: bool = False
               ) -> dict[str, Any]:
    """{"g_before", "g", attacks: {name: Attempt}, "m_score", "worst"} for `concept`."""
    from forget_me_not.attacks import check, run
    from forget_me_not.evaluate import applied
    from forget_me_not.sampling import recognition_score

    check(names)
    gen = settings.generation()
    base = recognition_score(pipe, concept, judge, concept.prompts(), gen,
                             desc=f"G {concept.name} (base)", progress=progress)
    after = base  # no patches: the model under test is the base model, same seeds
    if patches:
        with applied(pipe, patches):
            after = recognition_score(pipe, concept, judge, concept.prompts(), gen,
                                      desc=f"G {concept.name}", progress=progress)
    attempts = {n: run(n, pipe, patches, concept, judge, settings, base=base, progress=progress)
                for n in names}
    parts = {"generation": after.rate, **{n: a.rate for n, a in attempts.items()}}
    worst = max(parts, key=parts.__getitem__)
    return {"concept": concept.name, "g_before": base.rate, "g": after.rate,
            "attacks": attempts, "m_score": parts[worst], "worst": worst,
            "images": {"generation": after.images}}


def summary_lines(result: dict[str, Any]) -> list[str]:
    out = [f"{result['concept']}: G {result['g_before']:.0%} before, {result['g']:.0%} after"]
    for name, attempt in result["attacks"].items():
        extra = attempt.detail.get("tokens")
        found = f"  (found: {' '.join(extra)})" if extra else ""
        out.append(f"  {name:<12} {attempt.rate:>5.0%}{found}")
    out.append(f"  M-Score      {result['m_score']:>5.0%}  (worst: {result['worst']})")
    return out


def write_attack_report(result: dict[str, Any], out: Path, settings: AttackSettings,
                        meta: dict[str, Any]) -> Path:
    """attack.json and one labelled PNG sheet per attack into `out`, published whole."""
    import shutil
    import tempfile

    from forget_me_not.files import publish
    from forget_me_not.images import labelled_grid

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = {"generation": (result["images"]["generation"], None)}
        rows.update({n: (a.score.images, a) for n, a in result["attacks"].items()})
        for name, (images, attempt) in rows.items():
            if images:
                rate = result["g"] if attempt is None else attempt.rate
                title = f"{result['concept']}: {name} {rate:.0%}"
                labelled_grid(images[:32], title=title).save(tmp / f"{name}.png")
        data = {"concept": result["concept"], "g_before": result["g_before"], "g": result["g"],
                "m_score": result["m_score"], "worst": result["worst"],
                "attacks": {n: a.to_dict() for n, a in result["attacks"].items()},
                "settings": settings.to_dict(), **meta}
        (tmp / "attack.json").write_text(json.dumps(data, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        return publish(tmp, out, folder=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
