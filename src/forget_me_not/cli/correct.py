"""`fmn correct`: untangle a role word from the identity it is wrongly drawn as."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError


def correct(
    concept: Annotated[str, typer.Option(help="The role word(s), e.g. 'mulan' or 'wizard'.")],
    away_from: Annotated[
        str, typer.Option(help="The identity the role collapses onto, e.g. an actress' name.")
    ],
    out: Annotated[Path, typer.Option(help="Patch file to write (.safetensors).")],
    model: opt.Model = "embedded",
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of images of the entangled identity (default: world renders "
                          "on the embedded model, else the model draws them)."),
    ] = None,
    template: Annotated[
        list[str] | None,
        typer.Option(help="Prompt template of the role, with {} (repeatable)."),
    ] = None,
    preserve_weight: Annotated[
        float | None,
        typer.Option(help="Weight keeping the identity's own prompts intact (0 = off)."),
    ] = None,
    preserve: Annotated[
        list[str] | None,
        typer.Option(help="Prompts to keep intact (default: the identity's own prompts)."),
    ] = None,
    preserve_batch: Annotated[
        int | None,
        typer.Option(help="Preserve prompts compared per step (default: the model family's)."),
    ] = None,
    preserve_latents: opt.PreserveLatents = None,
    toward: Annotated[
        list[str] | None,
        typer.Option(help="Prompt showing the role on someone else, to pull the role toward "
                          "(repeatable; automatic on ConceptWorld)."),
    ] = None,
    toward_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the pull toward --toward prompts (0 = off)."),
    ] = None,
    judge_model: Annotated[
        Path | None,
        typer.Option(help="Local CLIP model folder to measure the entanglement on real models."),
    ] = None,
    check: Annotated[
        int, typer.Option(help="Role samples judged before training (0 = skip).")
    ] = 8,
    warn_below: Annotated[
        float, typer.Option(help="Warn when fewer role samples than this show the identity.")
    ] = 0.3,
    method: Annotated[
        str,
        typer.Option(help="embedding: train only the role's token rows toward the --toward "
                          "prompts (default); resteer: re-steer the UNet (a LoRA patch)."),
    ] = "embedding",
    train: Annotated[
        str, typer.Option(help="lora (patch), xattn or unet (--method resteer).")
    ] = "lora",
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default: the model family's).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (family default).")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (family default).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Move --concept away from --away-from; write the correction patch to --out."""
    from forget_me_not.correct import DEFAULT_PRESERVE_WEIGHT, METHODS
    from forget_me_not.correct import correct as run_correct
    from forget_me_not.data import image_files, load_images
    from forget_me_not.images import check_output_path
    from forget_me_not.models import detect_family, load_pipeline, resolve_device, resolve_dtype
    from forget_me_not.resteer import ResteerConfig

    # Check what the user typed before the (slow) model load.
    if method not in METHODS:
        raise FmnError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if check < 0:
        raise FmnError(f"--check must be 0 or more, got {check}")
    out = check_output_path(out, suffix=".safetensors")
    weight = DEFAULT_PRESERVE_WEIGHT if preserve_weight is None else preserve_weight
    ResteerConfig(preserve_weight=weight, preserve_prompts=tuple(preserve or ()) or ("-",))
    ResteerConfig(anchor_weight=toward_weight or 0.0, anchor_prompts=tuple(toward or ()) or ("-",))
    cfg = ResteerConfig(steps=steps, lr=lr, train=train, lora_rank=rank, seed=seed,
                        reference="images", preserve_batch=preserve_batch,
                        preserve_latents=preserve_latents, anchor_prompts=tuple(toward or ()))
    files: tuple[Path, ...] = ()
    if images is not None:
        files = tuple(image_files(images))
        load_images(files)
    if judge_model is not None and not judge_model.is_dir():
        raise FmnError(f"--judge-model {judge_model} is not a folder: pass a local CLIP model")
    if train != "lora" and dtype is None:
        dtype = "float32"
    resolve_dtype(dtype, resolve_device(device))

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    family = detect_family(pipe)
    role, entangled = _concepts(family, concept, away_from, template)
    if weight > 0:  # keep the identity itself drawable (its own prompts unless told others)
        cfg = dataclasses.replace(cfg, preserve_weight=weight, preserve_prompts=tuple(
            preserve or ()) or tuple(entangled.prompts()))
    judge = _judge(family, judge_model, entangled) if check > 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_correct(pipe, role, entangled, cfg, images=files, judge=judge,
                             n_check=check, warn_below=warn_below, preserve=weight > 0,
                             toward_weight=toward_weight, method=method)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    result.patch.save(out)
    rate = ("not measured (no judge)" if result.rate_before is None
            else f"{result.rate_before:.0%} of {check} samples")
    losses = result.patch.metadata["losses"]
    typer.echo(f"{concept!r} drawn as {away_from!r} before: {rate}")
    typer.echo(f"wrote {out} (references: {result.reference_source}; loss {losses[0]:.4f} -> "
               f"{losses[-1]:.4f})")


def _concepts(family: str, role: str, entangled: str, templates: list[str] | None):
    """The role and the identity as concepts; world concepts take the world's phrasing."""
    from forget_me_not.concepts import Concept
    from forget_me_not.presets import is_world_concept

    def make(name: str, own: list[str] | None) -> Concept:
        if family == "embedded" and is_world_concept(name):
            from forget_me_not.world.concepts import FMN_TEMPLATES, get

            wc = get(name)
            return Concept(name, wc.category, tuple(own or FMN_TEMPLATES[wc.kind]))
        return Concept(name, "id", tuple(own or ()))

    return make(role, templates), make(entangled, None)


def _judge(family: str, judge_model: Path | None, entangled):
    """The judge that can tell whether a sample shows the identity, or None (with a note)."""
    if judge_model is not None:
        from forget_me_not.judges.clip import ClipJudge

        return ClipJudge(str(judge_model),
                         labels={entangled.category: [entangled.name, "a person", "a man",
                                                      "a woman"]})
    if family == "embedded":
        from forget_me_not.judges.world import WorldJudge

        try:
            return WorldJudge()
        except FmnError as err:
            typer.echo(f"warning: entanglement not measured: {err}", err=True)
            return None
    typer.echo("note: entanglement not measured (pass --judge-model DIR of a local CLIP model)",
               err=True)
    return None


def register(app: typer.Typer) -> None:
    app.command("correct")(correct)
