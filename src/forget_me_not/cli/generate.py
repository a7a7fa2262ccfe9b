"""`fmn generate`: sample images from a model (optionally patched) into files and a grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tqdm.auto import tqdm

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError


def generate(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[
        Path, typer.Option(help="Grid PNG to write; samples go beside it as <stem>_<i>.png.")
    ],
    model: opt.Model = "embedded",
    negative: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    seed: opt.Seed = 0,
    steps: opt.Steps = 25,
    guidance: opt.Guidance = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels (model default).")] = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
    patch: opt.Patches = None,
) -> None:
    """Generate --n images of --prompt, save each and a labelled grid."""
    from forget_me_not.generation import check_size, default_size, generate_images
    from forget_me_not.images import check_output_path, labelled_grid, save_png
    from forget_me_not.models import load_pipeline, resolve_device, resolve_dtype

    # Check everything the user typed before the (slow) model load; nothing is written on error.
    opt.require_positive("--n", n)
    opt.require_positive("--steps", steps)
    opt.require_positive("--batch-size", batch_size)
    from forget_me_not.generation import MAX_SIZE

    if size is not None and not 1 <= size <= MAX_SIZE:
        raise FmnError(f"--size must be 1..{MAX_SIZE} (the model's own limit is checked after "
                       f"it loads), got {size}")
    resolve_dtype(dtype, resolve_device(device))
    out = check_output_path(out)
    for path in patch or []:
        if not path.is_file():
            raise FmnError(f"patch {path} does not exist; pass a file written by `fmn forget`")

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    size = size or default_size(pipe)
    check_size(pipe, size)
    if guidance is None:
        from forget_me_not.world.defaults import default_guidance

        guidance = default_guidance(pipe)
    for path in patch or []:
        _apply_patch(pipe, path)

    with tqdm(total=n * steps, unit="step", desc="generating", leave=False) as bar:
        images = generate_images(
            pipe,
            prompt,
            n=n,
            seed=seed,
            steps=steps,
            guidance=guidance,
            negative=negative,
            size=size,
            batch_size=batch_size,
            on_step=lambda: bar.update(1),
        )

    meta = {"prompt": prompt, "negative": negative or "", "model": str(model), "steps": str(steps)}
    for i, image in enumerate(images):
        save_png(image, out.with_name(f"{out.stem}_{i}.png"), {**meta, "seed": str(seed + i)})
    grid = labelled_grid(
        images, captions=[f"seed {seed + i}" for i in range(n)], title=f'"{prompt}"'
    )
    save_png(grid, out, {**meta, "seed": str(seed)})
    typer.echo(f"wrote {n} images and the grid {out}")


def _apply_patch(pipe, path: Path) -> None:
    try:
        from forget_me_not.patch import load_patch
    except ImportError as err:
        raise FmnError(
            "patches are not supported by this install (no forget_me_not.patch)"
        ) from err
    load_patch(path).apply(pipe)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
