"""`fmn bench --compare`: several methods/recipes (or patches) on the same targets, seeds and
judge, in one leaderboard.

Each entry is a recipe (trained here, per target group) or a patch file (scored as it is). The
base model is scored once; each run is then scored with its patch applied: G of every concept,
and the attacks on its targets: inversion I (anchors from the concept's references or the base
model's samples), the base text encoder E, unseen paraphrases P, the adversarial prompt search
A. M = max(G, I, E, P, A); retention is G_after / G_before of every other concept, and image
quality the KID of every other concept's samples to fresh renders on the judge's features,
against the base model's run-to-run spread. Each run's row is written to `runs/` as soon as
it is done, so an interrupted comparison resumes.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forget_me_not.errors import FmnError

KEEP = 0.95  # retention min an entry needs to be ranked as a forgetting that costs little
LOW = 0.9  # retention below this is named in the row


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    recipe: str | None = None
    patch: Path | None = None


def parse_entries(specs: Sequence[str]) -> list[Entry]:
    """Recipe names/files and patch files; at least two, no name twice."""
    from forget_me_not import recipes

    if len(specs) < 2:
        raise FmnError("--compare needs at least two entries (recipes or patch files) to compare")
    out = []
    for spec in specs:
        path = Path(spec)
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise FmnError(f"patch file {path} does not exist; pass a .safetensors patch")
            out.append(Entry(path.stem, patch=path))
        else:
            recipes.load(spec)  # an unknown name lists the valid ones
            out.append(Entry(path.stem if path.suffix else spec, recipe=spec))
    names = [e.name for e in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FmnError(f"--compare names {twice[0]!r} twice: give each entry once")
    return out


def parse_targets(text: str, valid: Sequence[str]) -> list[list[str]]:
    """"star,tavi,skull+gun" -> [["star"], ["tavi"], ["skull", "gun"]] (a '+' group is one run)."""
    groups = [[n.strip() for n in part.split("+") if n.strip()] for part in text.split(",")]
    groups = [g for g in groups if g]
    if not groups:
        raise FmnError("--targets is empty: name concepts, e.g. star,tavi,skull+gun")
    unknown = [n for g in groups for n in g if n not in valid]
    if unknown:
        raise FmnError(f"unknown target {unknown[0]!r}: use concepts of the suite "
                       f"({', '.join(valid)})")
    return groups


class PeakMemory:
    """Peak resident memory of this process over a block, above its start (MB)."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2**20


def _patch_for(pipe: Any, entry: Entry, group: list[str], concepts: dict, out: Path) -> tuple:
    """(patch, seconds, peak MB, bytes): trained from the recipe, or the entry's patch file."""
    from forget_me_not.api import forget
    from forget_me_not.patch import load_patch

    if entry.patch is not None:
        patch = load_patch(entry.patch)
        return patch, patch.metadata.get("seconds"), None, entry.patch.stat().st_size
    with PeakMemory() as memory:
        started = time.perf_counter()
        patch = forget(pipe, [concepts[n] for n in group], recipe=entry.recipe, progress=False)
        seconds = time.perf_counter() - started
    path = patch.save(out / "patches" / f"{entry.name}__{'+'.join(group)}.safetensors")
    return patch, seconds, memory.megabytes, path.stat().st_size


def run_compare(model: Any, specs: Sequence[str], suite_name: str, targets: str,
                out_dir: str | Path, *, overwrite: bool = False, n: int | None = None,
                seed: int | None = None, budget: int | None = None, device: str | None = None,
                dtype: str | None = None, progress: bool = True,
                placebo: bool = False) -> list[dict[str, Any]]:
    """Train or load every entry for every target group, score all on the same seeds; write
    leaderboard.{json,csv,md,html,png} into `out_dir`; return the rows, best first.
    `placebo`: each row also scores a placebo of its patch (its size per layer, random
    directions) for the retention a change of that size costs whatever it aims at."""
    from forget_me_not.bench.leaderboard import rank, write_leaderboard
    from forget_me_not.bench.runner import build_judges
    from forget_me_not.bench.suites import load_suite
    from forget_me_not.models import load_pipeline
    from forget_me_not.report import check_out_dir

    entries = parse_entries(specs)
    suite = load_suite(suite_name)
    main = [e for e in suite.select(None) if e.group == "main"]
    groups = parse_targets(targets, [e.concept.name for e in main])
    out = Path(out_dir)
    resume = out.is_dir() and (out / "runs").is_dir() and not overwrite
    if not resume:
        check_out_dir(out, overwrite)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "patches").mkdir(exist_ok=True)
    settings = suite.settings(n=n, seed=seed, budget=budget)
    pipe = load_pipeline(model, device=device, dtype=dtype) if isinstance(model, (str, Path)) \
        else model
    judges = build_judges(suite, main, device=device)
    scorer = _Scorer(pipe, suite, main, judges, settings, progress)
    base = scorer.score(set())
    quality = scorer.quality_base(base)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmn_compare_") as tmp:
        forgettable, scored = scorer.with_references(base, Path(tmp))
        for entry in entries:
            runs = [None] if entry.patch is not None else groups
            for group in runs:
                key = f"{entry.name}__{'+'.join(group or ['patch'])}"
                cached = out / "runs" / f"{key}.json"
                if cached.is_file():
                    rows.append(json.loads(cached.read_text()))
                    continue
                patch, seconds, peak, size = _patch_for(pipe, entry, group or [], forgettable,
                                                        out)
                names = group or [c["name"] for c in patch.metadata.get("concepts", [])]
                patch.apply(pipe)
                try:
                    after = scorer.score(set(names), scored, keep=quality is not None)
                finally:
                    patch.remove(pipe)
                attacks = scorer.attacks(patch, names, scored, forgettable)
                row = _row(entry, patch, names, base, after, seconds, peak, size, attacks)
                if quality is not None:
                    row.update(scorer.quality_after(quality, after, names))
                if placebo:
                    row["placebo_retention_min"] = scorer.placebo_retention(patch, names, base)
                cached.write_text(json.dumps(row, indent=1, default=str))
                rows.append(row)
    ranked = rank(rows, KEEP)
    write_leaderboard(ranked, out, {"suite": suite.name, "model": str(model), **{
        k: settings[k] for k in ("n", "seed", "budget")}, "keep": KEEP})
    return ranked


class _Scorer:
    """G for every concept (and I for the targets) with the suite's settings."""

    def __init__(self, pipe, suite, entries, judges, settings, progress) -> None:
        from forget_me_not.world.defaults import default_guidance, default_steps

        self.pipe, self.entries, self.judges, self.progress = pipe, entries, judges, progress
        self.settings = dict(settings)
        self.settings["steps"] = self.settings["steps"] or default_steps(pipe)
        if self.settings["guidance"] is None:
            self.settings["guidance"] = default_guidance(pipe)

    def score(self, targets: set[str], concepts: dict | None = None, only: list | None = None,
              prompts: dict | None = None, keep: bool = False, seed: int | None = None):
        """G of every concept (of `only` when given), I for `targets`; `prompts` by name
        replace a concept's own."""
        from forget_me_not.evaluate import evaluate_suite

        s = self.settings
        entries = [e for e in self.entries if only is None or e.concept.name in only]
        chosen = {e.key: (concepts or {}).get(e.concept.name, e.concept) for e in entries}
        keys = [e.key for e in entries if e.concept.name in targets]
        own = {e.key: list(e.prompts) for e in entries if e.prompts}
        own.update({e.key: list(prompts[e.concept.name]) for e in entries
                    if prompts and e.concept.name in prompts})
        return evaluate_suite(
            self.pipe, [], chosen, self.judges, n=s["n"], seed=s["seed"] if seed is None else seed,
            steps=s["steps"],
            guidance=s["guidance"], batch_size=s["batch_size"], inversion=keys or "none",
            budget=s["budget"], num_tokens=s["num_tokens"], lr=s["lr"],
            init_words=s["init_words"], max_anchors=s["max_anchors"], targets=targets,
            prompts=own, keep_images=keep or (not targets and only is None),
            progress=self.progress)

    def attack_settings(self) -> Any:
        from forget_me_not.attacks import AttackSettings

        s = self.settings
        return AttackSettings(n=s["n"], seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                              batch_size=s["batch_size"], budget=s["budget"],
                              num_tokens=s["num_tokens"], lr=s["lr"], init_words=s["init_words"],
                              max_anchors=s["max_anchors"])

    def attacks(self, patch: Any, names: list[str], scored: dict, trained: dict
                ) -> dict[str, dict[str, Any]]:
        """E, P and A on each target (I comes with the scoring): {attack: {"rate", ...}}, the
        highest rate over the targets."""
        from forget_me_not import attacks

        settings = self.attack_settings()
        by_name = {e.concept.name: e.key for e in self.entries}
        out: dict[str, dict[str, Any]] = {}
        for attack in ("encoder", "prompts", "adversarial"):
            for name in names:
                extra = {"exclude": tuple(trained[name].prompts())} if attack == "prompts" else {}
                found = attacks.run(attack, self.pipe, [patch], scored[name],
                                    self.judges[by_name[name]], settings,
                                    progress=self.progress, **extra)
                if attack not in out or found.rate > out[attack]["rate"]:
                    out[attack] = {"rate": found.rate, "concept": name, **found.detail}
        return out

    def quality_base(self, base) -> dict | None:
        """KID of every concept on the base model at two seed ranges (its run-to-run spread),
        when the judges expose features; None otherwise."""
        from forget_me_not import quality

        if not all(hasattr(j, "features") for j in self.judges.values()):
            return None
        judge = next(iter(self.judges.values()))
        names = [e.concept.name for e in self.entries]
        refs = quality.references(names, max(32, self.settings["n"]))
        again = self.score(set(), seed=self.settings["seed"] + 50_000, keep=True)
        first = quality.distances(judge, _images(base), refs)
        second = quality.distances(judge, _images(again), refs)
        return {"judge": judge, "refs": refs, "base": first, "spread_by": second}

    def placebo_retention(self, patch: Any, names: list[str], base: Any) -> float | None:
        """Retention min of the other concepts with a placebo of `patch` applied."""
        from forget_me_not.placebo import placebo

        control = placebo(patch, self.settings["seed"])
        control.apply(self.pipe)
        try:
            after = self.score(set(), only=[e.concept.name for e in self.entries
                                            if e.concept.name not in names])
        finally:
            control.remove(self.pipe)
        kept = _kept(base, after, names)
        return min(kept.values()) if kept else None

    def quality_after(self, q: dict, after, names: list[str]) -> dict[str, Any]:
        from forget_me_not import quality

        now = quality.distances(q["judge"], _images(after), q["refs"])
        worst, grown = quality.worst_change(now, q["base"], skip=names)
        return {"kid_worst": worst, "kid_change": grown,
                "kid_spread": quality.spread(q["base"], q["spread_by"], skip=names),
                "kid_targets": {n: now.get(n) for n in names}}

    def with_references(self, base, folder: Path) -> tuple[dict, dict]:
        """Per concept name: the concept to train on (as `fmn forget` would: world renders and
        the world's templates on the embedded model) and the one to score (the suite's prompts,
        with reference images for the inversion attack: world renders of other scenes than the
        training's, else the base model's own recognised samples)."""
        from forget_me_not.evaluate import choose_anchors
        from forget_me_not.images import save_numbered
        from forget_me_not.patch import family_of
        from forget_me_not.presets import is_world_concept, world_attack_images, world_concepts

        train, score = {}, {}
        world = family_of(self.pipe) == "embedded"
        for result in base.concepts:
            c = result.concept
            if c.images:
                train[c.name] = score[c.name] = c
            elif world and is_world_concept(c.name):
                train[c.name] = world_concepts([c.name], folder)[0]
                score[c.name] = dataclasses.replace(
                    c, images=world_attack_images(c.name, folder / "attack"))
            else:
                anchors = choose_anchors(result.before.g, self.settings["max_anchors"])
                paths = save_numbered(anchors, folder / c.name.replace(" ", "_"), "anchor")
                train[c.name] = score[c.name] = dataclasses.replace(c, images=tuple(paths))
        return train, score


def _images(result) -> dict[str, list]:
    """Each concept's G samples of a scoring (its 'before' phase), by name."""
    return {c.concept.name: list(c.before.g.images) for c in result.concepts}


def _kept(base: Any, after: Any, names: list[str]) -> dict[str, float]:
    """Each other concept's retention by name, G after / G before (those scored after, with G
    before above 0)."""
    now = {c.key: c.before.g.rate for c in after.concepts}
    return {c.concept.name: now[c.key] / c.before.g.rate for c in base.concepts
            if c.concept.name not in names and c.key in now and c.before.g.rate > 0}


def _row(entry: Entry, patch, names: list[str], base, after, seconds, peak, size,
         attacks: dict[str, dict[str, Any]]) -> dict:
    before = {c.key: c.before for c in base.concepts}
    now = {c.key: c.before for c in after.concepts}
    by_name = {c.key: c.concept.name for c in base.concepts}
    targets = [k for k in before if by_name[k] in names]
    g = max(now[k].g.rate for k in targets)
    inv = [now[k].i.rate for k in targets if now[k].i is not None]
    kept = _kept(base, after, names)
    meta = patch.metadata
    return {
        "entry": entry.name,
        "method": meta.get("method"),
        "recipe": meta.get("recipe") or entry.recipe,
        "target": "+".join(names),
        "g_after": g,
        "i_after": max(inv) if inv else None,
        "e_after": attacks["encoder"]["rate"],
        "p_after": attacks["prompts"]["rate"],
        "a_after": attacks["adversarial"]["rate"],
        "a_tokens": attacks["adversarial"].get("tokens"),
        "m_score": max([g, *inv, *(a["rate"] for a in attacks.values())]),
        "g_before": max(before[k].g.rate for k in targets),
        "retention_min": min(kept.values()) if kept else None,
        "retention_mean": sum(kept.values()) / len(kept) if kept else None,
        "below": sorted(k for k, v in kept.items() if v < LOW),
        "retention_each": {k: round(v, 4) for k, v in sorted(kept.items())},
        # stop_pull runs: the step kept and whether the threshold was reached there
        "stop": {k: v for k, v in (meta.get("stop") or {}).items() if k != "pull"} or None,
        "forget_seconds": seconds,
        "peak_mb": peak,
        "patch_bytes": size,
    }
