"""`fmn forget`: re-steer a model away from a concept and write the patch."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError

DEFAULT_SELF_IMAGES = 4  # references drawn by the model itself when no source is chosen


def forget(
    out: Annotated[Path, typer.Option(help="Patch file to write (.safetensors).")],
    concept: Annotated[
        list[str] | None,
        typer.Option(help="Words that call up the concept, e.g. 'star' (repeatable)."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A concept set forgotten in one run: nsfw (SD models), unsafe (embedded model)."
        ),
    ] = None,
    separately: Annotated[
        bool | None,
        typer.Option("--separately/--jointly",
                     help="Several concepts: one run each, patches stacked; or one run for all "
                          "(default: jointly; --preset unsafe: separately)."),
    ] = None,
    on_top_of: Annotated[
        list[Path] | None,
        typer.Option(help="A LoRA patch the new one will be stacked with (repeatable): it is "
                          "applied while training, and retention is kept against the model "
                          "without it. Stack them afterwards with `fmn patch stack`."),
    ] = None,
    model: opt.Model = "embedded",
    category: Annotated[str, typer.Option(help="id, object, style or nsfw.")] = "object",
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
    embedding: Annotated[
        Path | None,
        typer.Option(help="Forget the tokens learnt by `fmn invert` instead of the words."),
    ] = None,
    train: Annotated[
        str | None,
        typer.Option(help="lora (a LoRA on cross-attention), xattn, unet, tokens (only "
                          "the concept's token-embedding rows: no other prompt changes, but "
                          "the UNet still draws the concept from a learnt token), or "
                          "lora+tokens (both in one patch). Default: lora; the embedded "
                          "model: lora+tokens."),
    ] = None,
    lora_strength: Annotated[
        float | None,
        typer.Option(help="lora+tokens: the share of its trained size the LoRA keeps "
                          "(0..1; default: the model family's)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default: 35, the paper; model-tuned).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: 2e-6 full weights, LoRA tuned).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (default: 4, model-tuned).")] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(help="AdamW's decoupled weight decay (default: 0.01, model-tuned); a "
                          "larger one keeps the trained change small."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per step.")] = 1,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Clip the gradient norm to this (off by default).")
    ] = None,
    include_padding: Annotated[
        bool | None,
        typer.Option(
            "--include-padding/--no-include-padding",
            help="Also suppress every end-of-text/padding position (default: the "
            "model family's: off).",
        ),
    ] = None,
    include_eot: Annotated[
        bool, typer.Option("--include-eot", help="Also suppress the end-of-text token.")
    ] = False,
    extra_templates: Annotated[
        bool, typer.Option("--extra-templates", help="Add paraphrase prompt templates.")
    ] = False,
    preserve_weight: Annotated[
        float | None,
        typer.Option(help="Retention regulariser weight (default 0 = off, the paper's recipe; "
                          "model-tuned)."),
    ] = None,
    preserve: Annotated[
        list[str] | None,
        typer.Option(help="Prompt whose output the regulariser keeps (repeatable)."),
    ] = None,
    preserve_batch: Annotated[
        int | None,
        typer.Option(help="Preserve prompts compared per step (default: the model family's)."),
    ] = None,
    preserve_latents: opt.PreserveLatents = None,
    preserve_t_min: Annotated[
        int | None,
        typer.Option(help="With 'own' latents: lowest timestep the regulariser compares at "
                          "(default: the model family's)."),
    ] = None,
    text_keep_weight: Annotated[
        float | None,
        typer.Option(help="LoRA only: weight of the text-side retention term on to_k/to_v "
                          "(default: the model family's; 0 = off)."),
    ] = None,
    anchor: Annotated[
        str | None,
        typer.Option(help="What the concept should become: its prompts are also pulled toward "
                          "the same prompts with these words instead, e.g. 'a painting' "
                          "(default: none; ConceptWorld styles: solid)."),
    ] = None,
    anchor_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the pull toward --anchor (default: the model family's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw.")] = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    allow_pickle: opt.AllowPickle = False,
    config: opt.Config = None,
) -> None:
    """Make --model forget --concept; write the patch to --out."""
    from forget_me_not.api import forget as run_forget
    from forget_me_not.concepts import CATEGORIES, Concept, check_anchor
    from forget_me_not.data import load_images
    from forget_me_not.images import check_output_path
    from forget_me_not.models import load_pipeline, resolve_device, resolve_dtype
    from forget_me_not.resteer import ResteerConfig

    # Everything the user typed is checked before the (slow) model load.
    concept = list(concept or [])
    if not concept and preset is None:
        raise FmnError("say what to forget: --concept WORDS (repeatable) or --preset NAME")
    if preset is not None:
        from forget_me_not.presets import get_preset

        get_preset(preset)
    if category not in CATEGORIES:
        raise FmnError(f"unknown --category {category!r}: use one of {', '.join(CATEGORIES)}")
    for name in concept:
        Concept(name, category)  # validates the words
    sources = [images is not None, self_generate is not None, no_real_image]
    if sum(sources) > 1:
        raise FmnError("choose one of --images, --self-generate and --no-real-image")
    if self_generate is not None:
        opt.require_positive("--self-generate", self_generate)
    reference = "images" if images is not None else "noise" if no_real_image else "self"
    out = check_output_path(out, suffix=".safetensors")
    if train in ("xattn", "unet") and dtype is None:
        dtype = "float32"  # full-weight training keeps float32 weights
    resolve_dtype(dtype, resolve_device(device))
    cfg = ResteerConfig(
        steps=steps,
        lr=lr,
        train=train,
        lora_rank=rank,
        weight_decay=weight_decay,
        lora_strength=lora_strength,
        batch_size=batch_size,
        max_grad_norm=max_grad_norm,
        reference=reference,
        n_self_images=self_generate or DEFAULT_SELF_IMAGES,
        include_eot=include_eot,
        include_padding=include_padding,
        seed=seed,
        preserve_weight=preserve_weight,
        preserve_prompts=tuple(preserve or ()),
        preserve_batch=preserve_batch,
        preserve_latents=preserve_latents,
        preserve_t_min=preserve_t_min,
        text_keep_weight=text_keep_weight,
        concept_anchor_weight=anchor_weight,
    )
    check_anchor(anchor)  # before the model loads
    chosen_source = any(sources)
    files: tuple[Path, ...] = ()
    if images is not None:
        from forget_me_not.data import image_files

        files = tuple(image_files(images))
        load_images(files)  # unreadable files are reported now, sizes after loading
    earlier = []
    if on_top_of:
        from forget_me_not.api import check_on_top_of
        from forget_me_not.patch import load_patch

        earlier = [load_patch(path) for path in on_top_of]
        check_on_top_of(train, earlier)  # before the model loads
    emb = None
    if embedding is not None:
        from forget_me_not.inversion import load_embedding

        emb = load_embedding(embedding)

    pipe = load_pipeline(model, device, dtype, allow_pickle=allow_pickle, config=config)
    token_words = emb.load_into(pipe) if emb is not None else None
    with tempfile.TemporaryDirectory(prefix="fmn_refs_") as ref_dir:
        concepts, cfg, source = _concepts(
            pipe, concept, category, files, token_words, preset, cfg, chosen_source, Path(ref_dir)
        )
        concepts = [c.with_extra_templates() if extra_templates else c for c in concepts]
        if anchor is not None:
            concepts = [dataclasses.replace(c, anchor=anchor) for c in concepts]
        try:
            if separately is None:
                from forget_me_not.presets import get_preset

                separately = preset is not None and get_preset(preset).separately
            patch = run_forget(pipe, concepts, cfg, separately=separately, on_top_of=earlier)
        except KeyboardInterrupt:
            raise FmnError("interrupted: nothing was written; run the command again") from None
    if preset is not None:
        patch.metadata["preset"] = preset
    patch.metadata["reference_source"] = source
    patch.save(out)
    losses = patch.metadata["losses"]
    kind = f"{patch.kind} + token rows" if patch.kind == "lora" and patch.has_rows else patch.kind
    typer.echo(
        f"wrote {out} ({kind}, {len(patch.tensors)} tensors; loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} in {patch.metadata['seconds']:.1f} s)"
    )


def _concepts(pipe, names, category, files, token_words, preset, cfg, chosen_source, ref_dir: Path):
    """The concepts to forget, the config with its reference source settled, and that source.

    On the embedded model with no image source chosen, ConceptWorld concepts get world
    reference renders (what the world looks like) rather than the model's own drawings.
    """
    from forget_me_not.concepts import Concept
    from forget_me_not.models import detect_family
    from forget_me_not.presets import get_preset, is_world_concept, preset_concepts, world_concepts

    family = detect_family(pipe)
    concepts: list = []
    if preset is not None:
        concepts = preset_concepts(preset, family, ref_dir)
        if files:
            concepts = [dataclasses.replace(c, images=files) for c in concepts]
    plain = [Concept(n, category, images=files, token_words=token_words) for n in names]
    world_default = (
        family == "embedded"
        and not chosen_source
        and token_words is None
        and all(is_world_concept(n) for n in names)
    )
    if world_default:
        plain = world_concepts(names, ref_dir)
    concepts += plain
    if chosen_source:
        return concepts, cfg, cfg.reference
    if all(c.images for c in concepts):
        return concepts, dataclasses.replace(cfg, reference="images"), "world renders"
    if preset is not None and get_preset(preset).reference == "images":
        raise FmnError(
            f"--preset {preset} with these concepts needs an image source: pass "
            "--images, --self-generate N or --no-real-image"
        )
    return concepts, cfg, cfg.reference


def register(app: typer.Typer) -> None:
    app.command("forget")(forget)
