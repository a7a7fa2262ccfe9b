"""`fmn eval`: the M-Score of one concept (G, I, M) on a model, before and after patches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.cli.bench import (
    BatchSize,
    Budget,
    Judge,
    JudgeModel,
    MaybeGuidance,
    MaybeSeed,
    MaybeSteps,
    N,
    Overwrite,
    print_summary,
)
from forget_me_not.errors import FmnError


def resolve_entry(suite, concept: str, category: str | None, judge: str | None):
    """The suite's entry for `concept`, or a new one when --category names a concept outside it."""
    from forget_me_not.bench.suites import SuiteEntry
    from forget_me_not.concepts import Concept

    entry = suite.find(concept)
    if entry is None:
        if category is None:
            raise FmnError(
                f"unknown concept '{concept}' in suite '{suite.name}'; valid: "
                f"{', '.join(suite.main_names())} (or pass --category to evaluate a concept "
                "outside the suite)"
            )
        default_judge = {"nsfw": "nudenet"}.get(category, "clip")
        return SuiteEntry(concept, Concept(concept, category), judge or default_judge)
    if category is not None and category != entry.concept.category:
        raise FmnError(f"concept '{entry.concept.name}' is category {entry.concept.category} in "
                       f"suite '{suite.name}', not {category}; drop --category")
    return entry


def evaluate(
    concept: Annotated[str, typer.Option(help="Concept name, e.g. 'star' or 'van gogh'.")],
    model: opt.Model = "embedded",
    patch: opt.Patches = None,
    category: Annotated[str | None, typer.Option(help="id, object, style or nsfw (for a concept "
                                                      "outside the suite).")] = None,
    suite: Annotated[str | None, typer.Option(help="Suite to look the concept up in (default: "
                                                   "world for the embedded model, else "
                                                   "conceptbench).")] = None,
    judge: Judge = None,
    judge_model: JudgeModel = None,
    n: N = None,
    seed: MaybeSeed = None,
    steps: MaybeSteps = None,
    guidance: MaybeGuidance = None,
    batch_size: BatchSize = None,
    budget: Budget = None,
    no_inversion: Annotated[bool, typer.Option("--no-inversion",
                                               help="Skip the inversion score (M = G).")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write a report folder here.")] = None,
    attack_names: Annotated[list[str] | None, typer.Option(
        "--attack", help="Also run these attacks on the patched model and print the M-Score "
                         "over G and every one (as `fmn attack`; repeatable).")] = None,
    overwrite: Overwrite = False,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Measure how strongly --model (with --patch) still memorises --concept: G, I, M-Score."""
    from forget_me_not.bench.runner import run_bench
    from forget_me_not.bench.suites import Suite, load_suite
    from forget_me_not.concepts import CATEGORIES
    from forget_me_not.evaluate import processes

    for name, value in (("--n", n), ("--steps", steps), ("--batch-size", batch_size),
                        ("--budget", budget)):
        opt.require_positive(name, value)
    if category is not None and category not in CATEGORIES:
        raise FmnError(f"unknown category '{category}'; use one of {', '.join(CATEGORIES)}")
    plan = None
    if attack_names:
        from forget_me_not.cli.attack import prepare

        if not patch:
            raise FmnError("--attack needs the forgetting as --patch (and the base model as "
                           "--model)")
        plan = prepare(concept, model, patch, attack_names, n=n, seed=seed, steps=steps,
                       budget=budget, device=device)
    base = load_suite(suite or ("world" if model == "embedded" else "conceptbench"))
    entry = resolve_entry(base, concept, category, judge)
    one = Suite(base.name, base.description, [entry], base.labels, base.defaults, base.path)
    pipe = model
    if plan is not None:  # loaded once, for the scoring and the attacks
        from forget_me_not.models import load_pipeline

        pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                             config=config)
    result = run_bench(
        pipe, one, None, [Path(p) for p in patch or []], out, overwrite=overwrite, n=n,
        seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
        inversion="none" if no_inversion else "all", budget=budget, judge=judge,
        judge_model=judge_model, device=device, dtype=dtype, allow_pickle=allow_pickle,
        config=config,
    )
    if processes().is_main:
        print_summary(result)
        if out is not None:
            typer.echo(f"wrote {out / 'report.html'}")
    if plan is not None and processes().is_main:
        from forget_me_not.cli.attack import run

        run(pipe, plan)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
