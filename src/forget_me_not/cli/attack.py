"""`fmn attack`: every chosen attack on one concept of a model with its patches, as one
M-Score (G and each attack's recovery), printed and written as attack.json and PNG sheets."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.cli.bench import Budget, MaybeSeed, MaybeSteps, N, Overwrite
from forget_me_not.errors import FmnError

AttackNames = Annotated[list[str] | None, typer.Option(
    "--attack", help="inversion, encoder, prompts or adversarial (repeatable; default: all).")]


def attack(
    concept: Annotated[str, typer.Option(help="Concept name, e.g. 'star'.")],
    model: opt.Model = "embedded",
    patch: opt.Patches = None,
    attack_names: AttackNames = None,
    images: Annotated[Path | None, typer.Option(
        help="Reference images of the concept for the searching attacks (default: world "
             "renders on the embedded model, else the base model's recognised samples).")] = None,
    n: N = None,
    seed: MaybeSeed = None,
    steps: MaybeSteps = None,
    budget: Budget = None,
    tokens: Annotated[int, typer.Option(help="Tokens the adversarial search puts before the "
                                             "prompt.")] = 4,
    init_word: Annotated[bool, typer.Option(
        "--init-word", help="Start the inversion from the concept's own word.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write attack.json and PNG sheets here.")
                   ] = None,
    overwrite: Overwrite = False,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Try to bring --concept back from --model with --patch applied; print the M-Score."""
    from forget_me_not.models import load_pipeline

    plan = prepare(concept, model, patch, attack_names, n=n, seed=seed, steps=steps,
                   budget=budget, tokens=tokens, init_word=init_word, images=images, out=out,
                   overwrite=overwrite, device=device)
    pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                         config=config)
    run(pipe, plan)


def prepare(concept: str, model: str, patch: list[Path] | None, attack_names: list[str] | None,
            *, n: int | None = None, seed: int | None = None, steps: int | None = None,
            budget: int | None = None, tokens: int = 4, init_word: bool = False,
            images: Path | None = None, out: Path | None = None, overwrite: bool = False,
            device: str | None = None) -> dict:
    """Every check of an attack run, before any model is loaded; what `run` needs."""
    from forget_me_not.attacks import ATTACKS, AttackSettings, check
    from forget_me_not.bench.runner import build_judges
    from forget_me_not.bench.suites import load_suite
    from forget_me_not.cli.evaluate import resolve_entry
    from forget_me_not.evaluate import load_patches
    from forget_me_not.report import check_out_dir

    for flag, value in (("--n", n), ("--steps", steps), ("--budget", budget),
                        ("--tokens", tokens)):
        opt.require_positive(flag, value)
    names = check(attack_names or list(ATTACKS))
    if "encoder" in (attack_names or []) and not patch:
        raise FmnError("the encoder attack needs the base model and the forgetting apart: pass the "
                       "base model as --model and the forgetting as --patch")
    world = model == "embedded" or (Path(model) / "conceptworld.json").is_file()
    suite = load_suite("world" if world else "conceptbench")
    entry = resolve_entry(suite, concept, None, None)
    defaults = suite.settings(n=n, seed=seed, steps=steps, budget=budget)
    # Every search setting the suite gives, as `fmn bench` uses them: the same attack.
    settings = AttackSettings(n=defaults["n"], seed=defaults["seed"],
                              steps=defaults["steps"] or 25, guidance=defaults["guidance"],
                              batch_size=defaults["batch_size"], budget=defaults["budget"],
                              num_tokens=defaults["num_tokens"], lr=defaults["lr"],
                              max_anchors=defaults["max_anchors"], adversarial_tokens=tokens,
                              init_words=entry.concept.words if init_word else None)
    if images is not None and not images.is_dir():
        raise FmnError(f"--images {images} is not a folder; pass a folder of the concept's images")
    if out is not None:
        check_out_dir(out, overwrite)
    return {"names": names, "concept": entry.concept, "settings": settings, "images": images,
            "out": out, "model": model, "patch_files": [str(p) for p in patch or []],
            "patches": load_patches([Path(p) for p in patch or []]),
            "judge": build_judges(suite, [entry], device=device)[entry.key]}


def run(pipe, plan: dict) -> None:
    """The attacks of `prepare`d run on a loaded pipeline: printed, and written when --out."""
    from forget_me_not.attacks.report import attack_all, summary_lines, write_attack_report

    with tempfile.TemporaryDirectory(prefix="fmn_attack_") as tmp:
        target = _with_images(pipe, plan["concept"], plan["images"], Path(tmp))
        result = attack_all(pipe, plan["patches"], target, plan["judge"], plan["names"],
                            plan["settings"], progress=True)
        for line in summary_lines(result):
            typer.echo(line)
        out = plan["out"]
        if out is not None:
            write_attack_report(result, out, plan["settings"], {
                "model": plan["model"], "patches": plan["patch_files"]})
            typer.echo(f"wrote {out / 'attack.json'}")


def _with_images(pipe, concept, images: Path | None, folder: Path):
    """The concept with reference images: the user's, else world renders on the embedded
    model (other scenes than those `fmn forget` trains on), else none (the base model's own
    samples are used)."""
    import dataclasses

    from forget_me_not.data import image_files
    from forget_me_not.patch import family_of
    from forget_me_not.presets import is_world_concept, world_attack_images

    if images is not None:
        return dataclasses.replace(concept, images=tuple(image_files(images)))
    if family_of(pipe) == "embedded" and is_world_concept(concept.name):
        return dataclasses.replace(concept, images=world_attack_images(concept.name, folder))
    return concept


def register(app: typer.Typer) -> None:
    app.command("attack")(attack)
