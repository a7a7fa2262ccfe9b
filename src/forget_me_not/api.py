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
    joint run left the gun drawn (94%) where separate runs erased it (BENCHMARKS.md). With LoRA
    training each run trains on top of the patches before it, its retention terms comparing
    with the original model, so it also repairs what they did to the other concepts.

    `on_top_of`: LoRA patches the new one will be stacked with. They are applied while it
    trains, its retention terms compare with the model without them, and their concepts are
    left out of its preserve prompts (take-down requests that arrive one at a time).

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

    parts = _one_after_another(pipe, list(on_top_of), items, config, progress)
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


def _on_top_of(
    pipe: Any,
    earlier: list[Patch],
    items: list[Concept],
    config: ResteerConfig,
    progress: bool,
    again: Sequence[Concept] = (),
) -> Patch:
    """Re-steer `items` with the `earlier` patches applied, retention against the model alone.

    `again`: the earlier patches' concepts, with their references, re-steered once more beside
    `items` so the new patch keeps them down as well (known only within one `forget` call).
    """
    if not earlier:
        return resteer(pipe, items, config, progress=progress)
    if config.train != "lora" or any(p.kind != "lora" for p in earlier):
        raise FmnError("training on top of other patches needs LoRA patches and --train lora: "
                       "stack the patches afterwards with `fmn patch stack` instead")
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
        patch = resteer(pipe, [*items, *again], config, progress=progress)
    finally:
        for p in reversed(applied):
            p.remove(pipe)
    patch.metadata["trained_on_top_of"] = [p.name for p in earlier]
    return patch


def _one_after_another(
    pipe: Any, earlier: list[Patch], items: list[Concept], config: ResteerConfig, progress: bool
) -> list[Patch]:
    """One re-steering run per concept; LoRA runs train on top of the parts before them."""
    if config.train != "lora":
        return [_on_top_of(pipe, earlier, [c], config, progress) for c in items]
    # Every part's preserve prompts leave out all the concepts, the later ones included.
    config = dataclasses.replace(
        config, also_avoid=tuple(dict.fromkeys([*config.also_avoid, *(c.words for c in items)]))
    )
    parts: list[Patch] = []
    for k, concept in enumerate(items):
        parts.append(_on_top_of(pipe, [*earlier, *parts], [concept], config, progress,
                                again=items[:k]))
    return parts


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
