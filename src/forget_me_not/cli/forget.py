"""`fmn forget`: make a model forget a concept with a method and recipe; write the patch."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError
from forget_me_not.settings import parse_pair

DEFAULT_SELF_IMAGES = 4  # references drawn by the model itself when no source is chosen
# --set keys this command takes itself (not recipe fields).
CLI_KEYS = ("separately", "on_top_of", "extra_templates", "anchor")


def forget(
    out: Annotated[Path, typer.Option(help="Patch file to write (.safetensors).")],
    concept: Annotated[
        list[str] | None,
        typer.Option(help="Words that call up the concept, e.g. 'star' (repeatable); or a "
                          "token file from `fmn invert` to forget what it learnt."),
    ] = None,
    category: Annotated[str, typer.Option(help="id, object, style or nsfw; nsfw with no "
                                               "--concept: the model family's unsafe set (SD: "
                                               "nudity, sexual content; embedded: skull, gun)."
                                          )] = "object",
    model: opt.Model = "embedded",
    method: opt.Method = None,
    recipe: opt.Recipe = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder of reference images of the concept.")
    ] = None,
    self_generate: Annotated[
        int | None,
        typer.Option(help="Let the model draw N reference images itself (the default: 4)."),
    ] = None,
    no_real_image: Annotated[
        bool, typer.Option("--no-real-image", help="Reference = pure noise (zero latent).")
    ] = False,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps in total, every part (default: the "
                                      "recipe's).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate, every part (default: the "
                                                  "recipe's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    set_: opt.Sets = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Make --model forget --concept; write the patch to --out."""
    from forget_me_not import api
    from forget_me_not.cli.recipes import check_sets, split_cli_keys
    from forget_me_not.concepts import CATEGORIES, Concept
    from forget_me_not.data import load_images
    from forget_me_not.images import check_output_path
    from forget_me_not.models import load_pipeline, resolve_device, resolve_dtype

    # Everything the user typed is checked before the (slow) model load.
    names = list(concept or [])
    if not names and category != "nsfw":
        raise FmnError("say what to forget: --concept WORDS (repeatable), or --category nsfw "
                       "alone for the model family's unsafe set")
    if category not in CATEGORIES:
        raise FmnError(f"unknown --category {category!r}: use one of {', '.join(CATEGORIES)}")
    token_files = [Path(n) for n in names if n.endswith(".safetensors")]
    names = [n for n in names if not n.endswith(".safetensors")]
    for name in names:
        Concept(name, category)  # validates the words
    sources = [images is not None, self_generate is not None, no_real_image]
    if sum(sources) > 1:
        raise FmnError("choose one of --images, --self-generate and --no-real-image")
    if self_generate is not None:
        opt.require_positive("--self-generate", self_generate)
    sets, cli = split_cli_keys(list(set_ or []), CLI_KEYS)
    # the fields the user set, read as the recipe reads them ("fmn.reference" -> "reference")
    typed = {parse_pair(p)[0].rpartition(".")[2] for p in sets}
    if "anchor" in cli:
        from forget_me_not.concepts import check_anchor

        check_anchor(str(cli["anchor"]))
    reference = "images" if images is not None else "noise" if no_real_image else "self"
    chosen = api.plan(None, method, recipe)
    # What the user typed applies to every part (an error where no part has it); the reference
    # source and seed only to the parts that take them (UCE's closed form takes neither).
    sets += api.overrides(steps=steps, lr=lr)
    keys = {f.name for part in chosen.parts for f in dataclasses.fields(part.config)}
    implicit = api.overrides(seed=seed, reference=reference,
                             n_self_images=self_generate or DEFAULT_SELF_IMAGES)
    check_sets(chosen, sets + [p for p in implicit if p.split("=", 1)[0] in keys])
    if chosen.needs_images and images is None:
        raise FmnError(f"recipe {chosen.name} trains on reference images: pass --images DIR "
                       "(the official data has 10 per concept), or use --recipe paper-lora")
    out = check_output_path(out, suffix=".safetensors")
    if dtype is None and any(getattr(c, "train", "lora") != "lora"
                             for c in chosen.configs(False, sets)):
        dtype = "float32"  # full-weight training keeps float32 weights
    resolve_dtype(dtype, resolve_device(device))
    files: tuple[Path, ...] = ()
    if images is not None:
        from forget_me_not.data import image_files

        files = tuple(image_files(images))
        load_images(files)  # unreadable files are reported now, sizes after loading
    earlier = []
    if cli.get("on_top_of"):
        from forget_me_not.patch import load_patch

        earlier = [load_patch(path) for path in _paths(cli["on_top_of"])]
    embeddings = []
    if token_files:
        from forget_me_not.inversion import load_embedding

        embeddings = [load_embedding(path) for path in token_files]

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    from forget_me_not.models import detect_family

    family = detect_family(pipe)
    chosen = api.plan(family, method, recipe)  # the family check, before any work
    keys = {f.name for part in chosen.parts for f in dataclasses.fields(part.config)}
    # the family's own recipe decides which parts take a reference source and a seed; they go
    # first, so that a --set of the same key (e.g. fmn.seed=1 for one part) is not overridden
    sets = [p for p in implicit if p.split("=", 1)[0] in keys] + sets
    preset = None
    if not names and not token_files:  # --category nsfw alone
        from forget_me_not.presets import family_preset

        preset = family_preset(family)
    learnt = [Concept(path.stem, category, token_words=emb.load_into(pipe), images=files)
              for path, emb in zip(token_files, embeddings, strict=True)]
    with tempfile.TemporaryDirectory(prefix="fmn_refs_") as ref_dir:
        concepts, source = _concepts(family, names, category, files, preset, any(sources),
                                     Path(ref_dir))
        concepts += learnt
        if "anchor" in cli:  # what the concept should become (Kumari et al. 2023)
            concepts = [dataclasses.replace(c, anchor=str(cli["anchor"])) for c in concepts]
        if cli.get("extra_templates"):
            concepts = [c.with_extra_templates() for c in concepts]
        if source == "world renders" and "reference" in keys and "reference" not in typed:
            sets.append("reference=images")  # the renders, unless the user chose a source
        separately = cli.get("separately")
        if separately is None and preset is not None:
            from forget_me_not.presets import get_preset

            separately = get_preset(preset).separately
        patch = api.forget(pipe, concepts, method=method, recipe=recipe, sets=sets,
                           separately=separately, on_top_of=earlier)
    if preset is not None:
        patch.metadata["preset"] = preset
    patch.metadata["reference_source"] = source or reference
    patch.save(out)
    losses = patch.metadata["losses"]
    kind = f"{patch.kind} + token rows" if patch.kind == "lora" and patch.has_rows else patch.kind
    typer.echo(
        f"wrote {out} ({patch.metadata['method']} via {patch.metadata['recipe']}: {kind}, "
        f"{len(patch.tensors)} tensors; loss {losses[0]:.4f} -> {losses[-1]:.4f} in "
        f"{patch.metadata['seconds']:.1f} s)"
    )


def _paths(value: object) -> list[Path]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [Path(str(v)) for v in items]


def _concepts(family, names, category, files, preset, chosen_source, ref_dir: Path):
    """The concepts to forget and where their references come from.

    On the embedded model with no image source chosen, ConceptWorld concepts get world
    reference renders (what the world looks like) rather than the model's own drawings.
    """
    from forget_me_not.concepts import Concept
    from forget_me_not.presets import get_preset, is_world_concept, preset_concepts, world_concepts

    concepts: list = []
    if preset is not None:
        concepts = preset_concepts(preset, family, ref_dir)
        if files:
            concepts = [dataclasses.replace(c, images=files) for c in concepts]
    plain = [Concept(n, category, images=files) for n in names]
    if family == "embedded" and not chosen_source and all(is_world_concept(n) for n in names):
        plain = world_concepts(names, ref_dir)
    concepts += plain
    if chosen_source:
        return concepts, None
    if concepts and all(c.images for c in concepts):
        return concepts, "world renders"
    if preset is not None and get_preset(preset).reference == "images":
        raise FmnError(
            f"the {preset} set with these concepts needs an image source: pass "
            "--images, --self-generate N or --no-real-image"
        )
    return concepts, "self"


def register(app: typer.Typer) -> None:
    app.command("forget")(forget)
