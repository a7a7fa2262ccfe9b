"""The public entry points: `forget` (re-steering -> Patch) and `invert` (textual inversion)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.inversion import Embedding, train_inversion
from forget_me_not.patch import Patch
from forget_me_not.resteer import ResteerConfig, resteer


def forget(
    pipe: Any,
    concepts: Concept | str | Sequence[Concept | str],
    config: ResteerConfig | None = None,
    *,
    images: str | Path | Iterable[str | Path] | None = None,
    separately: bool = False,
    on_top_of: Sequence[Patch] = (),
    progress: bool = True,
) -> Patch:
    """Make `pipe` forget `concepts`; return the patch (the pipeline itself is left unchanged).

    `separately`: re-steer each concept in a run of its own and stack the patches (exactly, by
    rank) instead of one run cycling through all of them. On ConceptWorld's unsafe set the
    joint run left the gun drawn (94%) where separate runs erased it (BENCHMARKS.md).

    `on_top_of`: LoRA patches the new one will be stacked with. They are applied while it
    trains, its retention terms compare with the model without them, their concepts' prompts
    are held to what the patches make of them and left out of its preserve prompts. On
    ConceptWorld this kept the other concepts better and let the earlier ones come back more
    (BENCHMARKS.md, "Patches trained to be stacked").

    `concepts` are `Concept`s or plain names (taken as objects). `images` gives reference
    images for every concept that has none of its own. Apply the result with
    `patch.apply(pipe)`, save it with `patch.save(path)`.
    """
    if isinstance(concepts, (Concept, str)):
        concepts = [concepts]
    items = [c if isinstance(c, Concept) else Concept(c) for c in concepts]
    if not items:
        raise FmnError("no concept to forget: pass at least one concept")
    if images is not None:
        files = (Path(images),) if isinstance(images, (str, Path)) else tuple(map(Path, images))
        if len(files) == 1 and files[0].is_dir():
            from forget_me_not.data import image_files

            files = tuple(image_files(files[0]))
        items = [c if c.images else dataclasses.replace(c, images=files) for c in items]
    config = config or ResteerConfig()
    if not separately or len(items) == 1:
        return _on_top_of(pipe, list(on_top_of), items, config, progress)
    from forget_me_not.patch import stack_patches

    parts = [_on_top_of(pipe, list(on_top_of), [c], config, progress) for c in items]
    stacked = stack_patches(parts)
    first = parts[0].metadata
    stacked.metadata.update({
        "concepts": [c.to_dict() for c in items],
        "train": first.get("train"),
        "steps": sum(p.metadata.get("steps") or 0 for p in parts),
        "seed": first.get("seed"),
        "settings": first.get("settings"),
        "losses": [x for p in parts for x in p.metadata["losses"]],
        "seconds": round(sum(p.metadata.get("seconds", 0.0) for p in parts), 3),
        "separately": True,
    })
    return stacked


def check_on_top_of(train: str | None, earlier: Sequence[Patch]) -> None:
    """Training on top of patches works for plain LoRA patches and LoRA training only (the
    default train mode becomes "lora" there)."""
    if train not in (None, "lora") or any(p.kind != "lora" or p.has_rows for p in earlier):
        raise FmnError("--on-top-of needs LoRA patches without token rows and --train lora: "
                       "stack the patches afterwards with `fmn patch stack` instead")


def _on_top_of(
    pipe: Any, earlier: list[Patch], items: list[Concept], config: ResteerConfig, progress: bool
) -> Patch:
    """Re-steer `items` with the `earlier` patches applied, retention against the model alone."""
    if not earlier:
        return resteer(pipe, items, config, progress=progress)
    check_on_top_of(config.train, earlier)
    done = [Concept.from_dict(c) for p in earlier for c in p.metadata.get("concepts", [])]
    config = dataclasses.replace(
        config,
        compare_without=(*config.compare_without, *(p.name for p in earlier)),
        also_avoid=tuple(dict.fromkeys(
            [*config.also_avoid, *(c.words for c in done), *(c.words for c in items)])),
        hold_prompts=tuple(dict.fromkeys(
            [*config.hold_prompts, *(q for c in done for q in c.prompts())])),
    )
    applied: list[Patch] = []
    try:
        for p in earlier:
            p.apply(pipe)
            applied.append(p)
        patch = resteer(pipe, items, config, progress=progress)
    finally:
        for p in reversed(applied):
            p.remove(pipe)
    patch.metadata["trained_on_top_of"] = [p.name for p in earlier]
    return patch


def invert(
    pipe: Any,
    images: str | Path | Iterable[str | Path] | Iterable[Image.Image],
    *,
    num_tokens: int = 4,
    init_words: str | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Embedding:
    """Learn `num_tokens` placeholder tokens for the concept shown in `images`.

    `images` is a folder, a list of files, or a list of PIL images.
    The tokens stay loaded in `pipe`; forget them with `Concept(name, token_words=emb.phrase)`.
    Extra options (templates, batch_size, norm_target, mixed_precision) go to
    `inversion.train_inversion`.
    """
    return train_inversion(pipe, images, num_tokens=num_tokens, init_words=init_words,
                           steps=steps, lr=lr, seed=seed, progress=progress, **options)
