"""`fmn bench`: run a ConceptBench suite on a model, before and after patches; write a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError

Suite = Annotated[str, typer.Option(help="'world', 'conceptbench' or a suite .yaml file.")]
N = Annotated[int | None, typer.Option("--n", help="Samples per concept and phase "
                                                   "(default: the suite's).")]
MaybeSeed = Annotated[int | None, typer.Option(help="Base seed; sample i uses seed + i.")]
MaybeSteps = Annotated[int | None, typer.Option(help="Denoising steps (default: the suite's).")]
MaybeGuidance = Annotated[float | None, typer.Option(help="Guidance scale (default: the suite's).",
                                                    callback=opt.check_guidance)]
BatchSize = Annotated[int | None, typer.Option(help="Images per forward pass.")]
Budget = Annotated[int | None, typer.Option(help="Textual-inversion steps for I(c).")]
Judge = Annotated[str | None, typer.Option(help="Override the suite's judges: world, clip or "
                                                "nudenet.")]
JudgeModel = Annotated[str | None, typer.Option(help="CLIP model folder or hub id for the clip "
                                                     "judge.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")]


def print_summary(result) -> None:
    """A short table on stdout: G, I, M before (and after), retention."""
    has_after = any(c.after is not None for c in result.concepts)

    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    head = f"{'concept':<22} {'G':>6} {'I':>6} {'M':>6}"
    if has_after:
        head += f" | {'G>':>6} {'I>':>6} {'M>':>6} {'retain':>6}"
    typer.echo(head)
    for c in result.concepts:
        b = c.before
        line = f"{c.key[:21] + ('*' if c.target else ''):<22} {pct(b.g.rate)} " \
               f"{pct(None if b.i is None else b.i.rate)} {pct(b.m)}"
        if has_after and c.after is not None:
            a = c.after
            line += f" | {pct(a.g.rate)} {pct(None if a.i is None else a.i.rate)} " \
                    f"{pct(a.m)} {pct(c.retention)}"
        typer.echo(line)
    s = result.summary()
    if has_after:
        typer.echo(f"targets (*): M {pct(s['target_m_before'])} -> {pct(s['target_m_after'])}; "
                   f"retention of the others: mean {pct(s['mean_retention'])}, "
                   f"min {pct(s['min_retention'])}")


def bench(
    suite: Suite,
    out: Annotated[Path, typer.Option(help="Report folder (results.json, results.csv, "
                                           "report.md, report.html, images/, plots/).")],
    model: opt.Model = "embedded",
    patch: opt.Patches = None,
    concepts: Annotated[str | None, typer.Option(help="Comma-separated subset, e.g. 'star,milka'"
                                                      " (default: the whole suite).")] = None,
    n: N = None,
    seed: MaybeSeed = None,
    steps: MaybeSteps = None,
    guidance: MaybeGuidance = None,
    batch_size: BatchSize = None,
    inversion: Annotated[str | None, typer.Option(help="Which concepts get the inversion "
                                                       "score: all, targets or none.")] = None,
    budget: Budget = None,
    judge: Judge = None,
    judge_model: JudgeModel = None,
    overwrite: Overwrite = False,
    compare: Annotated[list[str] | None, typer.Option(
        help="A recipe or patch file to compare (repeatable, at least two): writes a "
             "leaderboard instead of one report.")] = None,
    targets: Annotated[str | None, typer.Option(
        help="--compare: what each recipe forgets, e.g. 'star,tavi,skull+gun' ('+': one "
             "run for several).")] = None,
    placebo: Annotated[bool, typer.Option(
        help="--compare: also score a placebo of each patch (its size per layer, random "
             "directions): the retention a change of that size costs, beside the patch's.")
    ] = False,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Evaluate --model on a suite (M-Score per concept, retention), optionally with --patch;
    or compare methods with --compare."""
    from forget_me_not.bench.runner import run_bench
    from forget_me_not.evaluate import processes

    for name, value in (("--n", n), ("--steps", steps), ("--batch-size", batch_size),
                        ("--budget", budget)):
        opt.require_positive(name, value)
    if placebo and compare is None:
        raise FmnError("--placebo scores a placebo beside each compared patch: use it with "
                       "--compare")
    if compare is not None or targets is not None:
        _compare(model, compare or [], suite, targets, out, overwrite, n, seed, budget, device,
                 dtype, bool(patch), placebo)
        return
    result = run_bench(
        model, suite, concepts.split(",") if concepts is not None else None,
        [Path(p) for p in patch or []], out, overwrite=overwrite, n=n, seed=seed, steps=steps,
        guidance=guidance, batch_size=batch_size, inversion=inversion, budget=budget,
        judge=judge, judge_model=judge_model, device=device, dtype=dtype,
        allow_pickle=allow_pickle, config=config,
    )
    if processes().is_main:
        print_summary(result)
        typer.echo(f"wrote {out / 'report.html'} ({result.seconds:.1f} s)")


def _compare(model, entries, suite, targets, out, overwrite, n, seed, budget, device, dtype,
             with_patch, placebo=False) -> None:
    from forget_me_not.bench.compare import parse_entries, run_compare
    from forget_me_not.bench.leaderboard import markdown

    parse_entries(entries)  # before anything loads
    if with_patch:
        raise FmnError("--compare takes patch files as entries: drop --patch")
    if not targets:
        raise FmnError("--compare needs --targets, e.g. --targets star,tavi,skull+gun")
    rows = run_compare(model, entries, suite, targets, out, overwrite=overwrite, n=n, seed=seed,
                       budget=budget, device=device, dtype=dtype, placebo=placebo)
    typer.echo(markdown(rows, {"suite": suite, "n": n, "seed": seed, "budget": budget,
                               "keep": 0.95}))
    typer.echo(f"wrote {out}/leaderboard.md, .csv, .json, .html, .png")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
