"""Option types shared by the `fmn` commands, so each flag means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="'embedded' (ConceptWorld), a diffusers folder, a .safetensors file or a hub id.",
    ),
]
Device = Annotated[
    str | None,
    typer.Option(help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)."),
]
Dtype = Annotated[
    str | None,
    typer.Option(help="float32/fp32, float16/fp16 or bfloat16/bf16 (default: fp16 on cuda)."),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow .ckpt/.pt/.bin/.pth checkpoints (weights-only load; trusted files only).",
    ),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Local diffusers folder giving the configs for a single-file checkpoint (offline).",
    ),
]
Method = Annotated[
    str | None,
    typer.Option(help="fmn, token_rows, ... (`fmn recipes` lists them; default: the recipe's)."),
]
Recipe = Annotated[
    str | None,
    typer.Option(help="A shipped recipe (`fmn recipes`) or a .yaml file (default: the model "
                      "family's for the method)."),
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="KEY=VALUE overriding a recipe field, every part that has it; "
                               "METHOD.KEY=VALUE for one part (repeatable)."),
]
Seed = Annotated[int, typer.Option(help="Base seed; sample i uses seed + i.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
def check_guidance(value: float | None) -> float | None:
    """A guidance scale is a finite number >= 0 (1 = no guidance)."""
    import math

    from forget_me_not.errors import FmnError

    if value is not None and not (math.isfinite(value) and value >= 0):
        raise FmnError(f"--guidance must be a finite number >= 0, got {value}")
    return value


Guidance = Annotated[
    float | None,
    typer.Option(help="Classifier-free guidance scale (default: the model's own, else 7.5).",
                 callback=check_guidance),
]
Patches = Annotated[
    list[Path] | None,
    typer.Option("--patch", help="Forgetting patch to apply before generating (repeatable)."),
]


def require_positive(name: str, value: int | None) -> None:
    """One-line error for a count that must be at least 1."""
    from forget_me_not.errors import FmnError

    if value is not None and value < 1:
        raise FmnError(f"{name} must be a positive integer, got {value}")
