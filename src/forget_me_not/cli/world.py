"""`fmn world ...`: the embedded ConceptWorld — render, look at, and (re)train it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError

MAX_RENDER = 1024  # the world is drawn at 32 px; far larger sizes only cost memory

world_app = typer.Typer(
    help="The embedded ConceptWorld: render, sheet, train-model, train-judge.", no_args_is_help=True
)


@world_app.command("render")
def render_cmd(
    caption: Annotated[
        str, typer.Option(help="A world caption, e.g. 'a red star in striped style'.")
    ],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    size: Annotated[int, typer.Option(help="Side in pixels.")] = 32,
    seed: opt.Seed = 0,
) -> None:
    """Draw the picture a caption describes (exactly, with no model)."""
    from forget_me_not.images import check_output_path, save_png
    from forget_me_not.world.render import render
    from forget_me_not.world.sheet import parse_caption

    opt.require_positive("--size", size)
    if size > MAX_RENDER:
        raise FmnError(f"--size {size} is above the renderer's {MAX_RENDER} px: use "
                       f"8..{MAX_RENDER}")
    out = check_output_path(out)
    save_png(render(parse_caption(caption, seed), size=size), out, {"caption": caption})
    typer.echo(f"wrote {out}")


@world_app.command("sheet")
def sheet_cmd(
    out: Annotated[Path, typer.Option(help="PNG sheet to write.")],
    model: opt.Model = "embedded",
    concepts: Annotated[
        str | None, typer.Option(help="Comma-separated concepts (default all).")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Renders and samples per concept.")] = 4,
    seed: opt.Seed = 0,
    steps: opt.Steps = 25,
    guidance: opt.Guidance = None,
    patch: opt.Patches = None,
    renders_only: Annotated[
        bool, typer.Option(help="Only renders: every subject x style.")
    ] = False,
) -> None:
    """A labelled PNG: one row per concept, renders beside model samples and the judge's reading."""
    from tqdm.auto import tqdm

    from forget_me_not.images import check_output_path, save_png
    from forget_me_not.world.sheet import concept_sheet, render_sheet

    opt.require_positive("--n", n)
    opt.require_positive("--steps", steps)
    out = check_output_path(out)
    if renders_only:
        save_png(render_sheet(seed), out)
        typer.echo(f"wrote {out}")
        return
    from forget_me_not.judges.world import WorldJudge
    from forget_me_not.models import load_pipeline
    from forget_me_not.world.defaults import default_guidance

    names = [c.strip() for c in concepts.split(",")] if concepts else None
    if names:
        from forget_me_not.world import concepts as world_concepts

        for name in names:
            world_concepts.get(name)  # fails early, listing the valid names
    judge = WorldJudge()
    pipe = load_pipeline(model)
    for path in patch or []:
        from forget_me_not.patch import load_patch

        load_patch(path).apply(pipe)
    pipe.set_progress_bar_config(disable=True)
    total = len(names) if names else None
    with tqdm(total=total, desc="concepts", unit="concept") as bar:
        sheet = concept_sheet(
            pipe,
            judge,
            names=names,
            n=n,
            seed=seed,
            steps=steps,
            guidance=guidance or default_guidance(pipe),
            progress=lambda: bar.update(1),
        )
    save_png(sheet, out)
    typer.echo(f"wrote {out}")


@world_app.command("train-model")
def train_model_cmd(
    run_dir: Annotated[Path, typer.Option(help="Checkpoints and logs (resumes from here).")] = Path(
        "runs/world-model"
    ),
    export_dir: Annotated[Path | None, typer.Option(help="Where the pipeline goes.")] = None,
    unet_steps: Annotated[int, typer.Option(help="UNet + text encoder steps.")] = 8000,
    vae_steps: Annotated[int, typer.Option(help="VAE steps.")] = 500,
    cooldown_steps: Annotated[
        int, typer.Option(help="Decay the UNet lr linearly to zero over the last N steps.")
    ] = 1500,
    unet_lr: Annotated[
        float, typer.Option(help="Peak UNet lr (lower it when resuming to train on).")
    ] = 5e-4,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop the UNet stage after this.")
    ] = None,
    boost: Annotated[
        list[str] | None,
        typer.Option(help="WORD=W: draw captions holding WORD W times as often (repeatable)."),
    ] = None,
    leave_out: Annotated[
        list[str] | None,
        typer.Option(help="A world concept no training pair names or shows: the retrained "
                     "reference an unlearning method is read against (repeatable)."),
    ] = None,
    seed: opt.Seed = 0,
    device: opt.Device = None,
) -> None:
    """Train the tiny text-to-image model (resumable; rerun the same command to continue)."""
    from forget_me_not.models import resolve_device
    from forget_me_not.world.train_config import TrainModelConfig, parse_boost
    from forget_me_not.world.train_model import train_model

    opt.require_positive("--unet-steps", unet_steps)
    opt.require_positive("--vae-steps", vae_steps)
    cfg = TrainModelConfig(
        run_dir=run_dir,
        export_dir=export_dir,
        unet_steps=unet_steps,
        vae_steps=vae_steps,
        cooldown_steps=cooldown_steps,
        unet_lr=unet_lr,
        max_minutes=max_minutes,
        seed=seed,
        device=str(resolve_device(device)),
        caption_boost=parse_boost(boost or []),
        leave_out=tuple(leave_out or ()),
    )
    typer.echo(f"exported {train_model(cfg)}")


@world_app.command("train-judge")
def train_judge_cmd(
    run_dir: Annotated[Path, typer.Option(help="Checkpoints and metrics (resumes).")] = Path(
        "runs/judge"
    ),
    out: Annotated[Path | None, typer.Option(help="Weights file to write.")] = None,
    vae_dir: Annotated[Path | None, typer.Option(help="A world pipeline's vae folder.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 3000,
    init: Annotated[Path | None, typer.Option(
        help="Start from these judge weights (heads they lack start fresh).")] = None,
    model_dir: Annotated[Path | None, typer.Option(
        help="A world pipeline folder: its failed one-step samples join the rejects.")] = None,
    pool_size: Annotated[int, typer.Option(help="Rendered training images.")] = 20_000,
    kept_samples: Annotated[int, typer.Option(
        help="The model's finished samples that --init's heads read as their caption asks, "
        "taught as not rejects (needs --init and --model-dir; 0: none).")] = 0,
    seed: opt.Seed = 0,
    device: opt.Device = None,
) -> None:
    """Train the judge classifier on renders (and VAE reconstructions) with a reject class
    ("none of these"), calibrated."""
    from forget_me_not.models import resolve_device
    from forget_me_not.world.train_judge import TrainJudgeConfig, train_judge

    opt.require_positive("--steps", steps)
    opt.require_positive("--pool-size", pool_size)
    if kept_samples < 0:
        raise FmnError(f"--kept-samples must be 0 or more, got {kept_samples}")
    if kept_samples and (init is None or model_dir is None):
        raise FmnError("--kept-samples needs --init (its heads pick the well-drawn samples) and "
                       "--model-dir (the model that draws them)")
    for name, path in (("--init", init), ("--model-dir", model_dir), ("--vae-dir", vae_dir)):
        if path is not None and not path.exists():
            raise FmnError(f"{name} {path} does not exist; pass an existing path")
    cfg = TrainJudgeConfig(
        run_dir=run_dir,
        out=out,
        vae_dir=vae_dir,
        steps=steps,
        init=init,
        model_dir=model_dir,
        pool_size=pool_size,
        kept_samples=kept_samples,
        seed=seed,
        device=str(resolve_device(device)),
    )
    typer.echo(f"wrote {train_judge(cfg)}")


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")


@world_app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the patch, sheet and summary.")] = Path(
        "out/demo"
    ),
    target: Annotated[str, typer.Option(help="World concept to forget.")] = "star",
    n: Annotated[int, typer.Option("--n", help="Samples per concept, before and after.")] = 8,
    seed: opt.Seed = 1000,
) -> None:
    """Forget one concept on the embedded model; write a before/after sheet with judge scores."""
    from forget_me_not.demo import run_demo

    opt.require_positive("--n", n)
    summary = run_demo(out, target=target, n=n, seed=seed)
    for name, s in summary["scores"].items():
        typer.echo(f"{name:>10}: {s['before']:.0%} -> {s['after']:.0%}")
    typer.echo(f"forgot '{target}' in {summary['forget_seconds']} s; wrote {out}/before_after.png")
