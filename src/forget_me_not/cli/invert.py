"""`fmn invert`: learn placeholder tokens for a concept from images (textual inversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError


def invert(
    images: Annotated[Path, typer.Option(help="Folder of images showing the concept.")],
    out: Annotated[Path, typer.Option(help="Embedding file to write (.safetensors).")],
    model: opt.Model = "embedded",
    tokens: Annotated[int, typer.Option(help="Number of placeholder tokens.")] = 4,
    init: Annotated[
        str | None, typer.Option(help="Words to start the tokens from (the rest random).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 500,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    template: Annotated[
        list[str] | None, typer.Option(help="Prompt template with '{}' (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Learn --tokens placeholder tokens from --images; write them to --out."""
    from forget_me_not.api import invert as run_invert
    from forget_me_not.data import load_images
    from forget_me_not.images import check_output_path
    from forget_me_not.inversion import DEFAULT_TEMPLATES
    from forget_me_not.models import load_pipeline, resolve_device, resolve_dtype

    opt.require_positive("--tokens", tokens)
    opt.require_positive("--steps", steps)
    if not lr > 0:
        raise FmnError(f"--lr must be positive, got {lr}")
    out = check_output_path(out, suffix=".safetensors")
    resolve_dtype(dtype, resolve_device(device))
    load_images(images)  # empty folder / unreadable files are reported before the model loads

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    try:
        emb = run_invert(pipe, images, num_tokens=tokens, init_words=init, steps=steps, lr=lr,
                         seed=seed, templates=tuple(template or DEFAULT_TEMPLATES))
    except KeyboardInterrupt:
        raise FmnError("interrupted: nothing was written; run the command again") from None
    emb.save(out)
    typer.echo(f"wrote {out}: forget it with `fmn forget --embedding {out} ...`, "
               f"or prompt with {emb.phrase!r} after loading it")


def register(app: typer.Typer) -> None:
    app.command("invert")(invert)
