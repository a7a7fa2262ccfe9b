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
    method: Annotated[
        str,
        typer.Option(help="embedding: train only the role's token rows toward the --toward "
                          "prompts (default); resteer: re-steer the UNet (a LoRA patch)."),
    ] = "embedding",
    recipe: opt.Recipe = None,
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of images of the entangled identity (default: world renders "
                          "on the embedded model, else the model draws them)."),
    ] = None,
    toward: Annotated[
        list[str] | None,
        typer.Option(help="Prompt showing the role on someone else, to pull the role toward "
                          "(repeatable; automatic on ConceptWorld)."),
    ] = None,
    judge_model: Annotated[
        Path | None,
        typer.Option(help="Local CLIP model folder to measure the entanglement on real models."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default: the recipe's).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the recipe's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    set_: opt.Sets = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Move --concept away from --away-from; write the correction patch to --out."""
    from forget_me_not import recipes
    from forget_me_not.data import image_files, load_images
    from forget_me_not.images import check_output_path
    from forget_me_not.methods.correction.train import correct as run_correct
    from forget_me_not.models import detect_family, load_pipeline, resolve_device, resolve_dtype

    # Check what the user typed before the (slow) model load.
    pairs = [f"variant={method}", f"seed={seed}", *(set_ or [])]
    if toward:
        pairs.append(f"toward={list(toward)!r}")
    if method == "embedding":
        pairs += [f"pull_steps={steps}"] * (steps is not None) + [f"pull_lr={lr!r}"] * (
            lr is not None)
    chosen = recipes.load(recipe or "correction")
    if [p.method for p in chosen.parts] != ["correction"]:
        raise FmnError(f"recipe {chosen.name} is not a correction recipe: use correction")
    settings = chosen.configs(False, pairs)[0]
    out = check_output_path(out, suffix=".safetensors")
    files: tuple[Path, ...] = ()
    if images is not None:
        files = tuple(image_files(images))
        load_images(files)
    if judge_model is not None and not judge_model.is_dir():
        raise FmnError(f"--judge-model {judge_model} is not a folder: pass a local CLIP model")
    resolve_dtype(dtype, resolve_device(device))

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    family = detect_family(pipe)
    fmn = None
    if settings.variant == "resteer":
        from forget_me_not import api

        fmn_recipe = api.plan(family, "fmn")
        extra = api.overrides(steps=steps, lr=lr)
        fmn = fmn_recipe.configs(False, extra)[0]
        if steps is not None:  # --steps is the run's, not multiplied
            settings = dataclasses.replace(settings, step_factor=1)
    role, entangled = _concepts(family, concept, away_from, None)
    judge = _judge(family, judge_model, entangled) if settings.n_check > 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_correct(pipe, role, entangled, settings, fmn, images=files, judge=judge)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    result.patch.metadata["recipe"] = chosen.name
    result.patch.save(out)
    rate = ("not measured (no judge)" if result.rate_before is None
            else f"{result.rate_before:.0%} of {settings.n_check} samples")
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
