"""The public entry points: `forget` (a method + recipe -> Patch) and `invert` (textual inversion).

`forget` resolves a recipe (given, or the model family's default for the method), applies the
caller's overrides to every part that has the key, runs the recipe's inversion stage when it has
one and images are given, trains each part on the base model through the method registry, and
returns one patch whose metadata records the method(s), the recipe and every resolved config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from forget_me_not import methods, recipes
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.inversion import Embedding, train_inversion
from forget_me_not.patch import Patch, adapter_name, family_of, stack_patches


def plan(family: str | None, method: str | None = None, recipe: str | Path | None = None,
         config: Any = None) -> recipes.Recipe:
    """The recipe a run uses, checked against the method and (when known) the family."""
    if config is not None:
        name = next((m for m in methods.names() if methods.get(m).config_class is type(config)),
                    None)
        if name is None:
            raise FmnError(f"{type(config).__name__} is no registered method's config")
        chosen = recipes.Recipe(f"{name}-config", "a config given by the caller",
                                (recipes.Part(name, config, {}),))
    elif recipe is not None:
        chosen = recipes.load(recipe)
    else:
        found = recipes.default_for(family or "", method)
        chosen = recipes.load(found) if found else recipes.from_method(method or "fmn")
    used = {part.method for part in chosen.parts}
    if method is not None:
        methods.get(method)  # an unknown name lists the valid ones
        if used != {method}:
            raise FmnError(f"recipe {chosen.name} is for method {'+'.join(sorted(used))}, not "
                           f"{method}: drop --method or choose a recipe for it")
    if any(methods.get(m).task != "forget" for m in used):
        raise FmnError(f"recipe {chosen.name} is not a forgetting recipe: use `fmn correct`")
    if family is not None:
        chosen.check_family(family)
        for m in used:
            methods.check_family(methods.get(m), family)
    return chosen


def overrides(steps: int | None = None, lr: float | None = None, seed: int | None = None,
              reference: str | None = None, n_self_images: int | None = None) -> list[str]:
    """The common options as `--set` pairs (explicit steps are steps in total)."""
    pairs = [f"steps={steps}", "steps_per=run"] if steps is not None else []
    pairs += [f"{key}={value!r}" for key, value in (("lr", lr), ("seed", seed),
              ("reference", reference), ("n_self_images", n_self_images)) if value is not None]
    return pairs


def forget(
    pipe: Any,
    concepts: Concept | str | Sequence[Concept | str],
    config: Any = None,
    *,
    method: str | None = None,
    recipe: str | Path | None = None,
    sets: Sequence[str] = (),
    images: str | Path | Iterable[str | Path] | None = None,
    separately: bool | None = None,
    on_top_of: Sequence[Patch] = (),
    progress: bool = True,
) -> Patch:
    """Make `pipe` forget `concepts`; return the patch (the pipeline itself is left unchanged).

    `recipe`: a shipped name or a YAML file (default: the family's recipe for `method`, or
    the family's default); `config`: a method's config object instead of a recipe. `sets`:
    "KEY=VALUE" overrides for every part with that key ("METHOD.KEY=VALUE" for one part).
    `separately`: one run per concept, patches stacked (default: the recipe's). `on_top_of`:
    LoRA patches the new one will be stacked with; they are applied while it trains, and its
    retention terms compare with the model without them (the recipe's LoRA part alone runs).
    """
    items = _concepts(concepts, images)
    chosen = plan(family_of(pipe), method, recipe, config)
    if chosen.needs_images and not all(c.images for c in items):
        raise FmnError(f"recipe {chosen.name} trains on reference images: pass --images DIR "
                       "(the official data has 10 per concept), or use paper-lora")
    missing = next((c for c in items if not any(part.takes(c) for part in chosen.parts)), None)
    if missing is not None:
        kind = "that name an anchor (a style)" if missing.anchor else "without an anchor"
        raise FmnError(f"recipe {chosen.name} has no part for {missing.name!r}: none of its "
                       f"parts trains concepts {kind}; choose another --recipe")
    configs = chosen.configs(any(c.anchor for c in items), list(sets))
    parts = list(zip(chosen.parts, configs, strict=True))
    if on_top_of:
        parts = _lora_part(chosen, parts, on_top_of)
    items, inverted = _inversion_stage(pipe, items, chosen, progress)
    apart = chosen.separately if separately is None else separately
    groups = [[c] for c in items] if apart and len(items) > 1 else [items]
    sequential = chosen.sequential and not on_top_of  # on top of patches: the LoRA part alone
    done = [_train_parts(pipe, group, parts, list(on_top_of), progress, sequential)
            for group in groups]
    patch = done[0] if len(done) == 1 else _stacked(done, items)
    patch.metadata["recipe"] = chosen.name
    patch.metadata["recipe_file"] = chosen.path
    if inverted:
        patch.metadata["inversion"] = inverted
    return patch


def _concepts(concepts: Any, images: Any) -> list[Concept]:
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
    return items


def _lora_part(chosen: recipes.Recipe, parts: list, earlier: Sequence[Patch]) -> list:
    """Training on top of LoRA patches: the recipe's LoRA part alone, at full size."""
    if any(p.kind != "lora" or p.has_rows for p in earlier):
        raise FmnError("--on-top-of needs LoRA patches without token rows: stack the patches "
                       "afterwards with `fmn patch stack` instead")
    lora = [(dataclasses.replace(part, scale=1.0), cfg) for part, cfg in parts
            if part.method == "fmn" and cfg.train == "lora"]
    if not lora:
        raise FmnError(f"recipe {chosen.name} has no LoRA part to train on top of patches: use "
                       "a recipe with one (e.g. paper-lora), or stack afterwards")
    return lora[:1]


def _inversion_stage(pipe: Any, items: list[Concept], chosen: recipes.Recipe,
                     progress: bool) -> tuple[list[Concept], list[dict[str, Any]]]:
    """The recipe's first stage: learn tokens for each concept from its images, then forget
    those tokens (the learnt tokens stay loaded in `pipe`, as `invert` leaves them)."""
    settings = chosen.inversion
    if not settings:
        return items, []
    out, record = [], []
    for concept in items:
        if not concept.images or concept.token_words:
            out.append(concept)
            continue
        emb = train_inversion(
            pipe, concept.images, num_tokens=settings.get("num_tokens", 4),
            init_words=concept.name if settings.get("init", "words") == "words" else None,
            steps=settings.get("steps", 500), lr=settings.get("lr", 1e-3),
            templates=concept.templates, norm_target=settings.get("norm_target", 0.4),
            init_sigma=settings.get("init_sigma"), weight_decay=settings.get("weight_decay", 0.0),
            flip_p=settings.get("flip_p", 0.0), progress=progress)
        out.append(dataclasses.replace(concept, token_words=emb.phrase))
        record.append({"concept": concept.name, "tokens": emb.phrase,
                       "losses": emb.metadata["losses"], "settings": settings})
    return out, record


def _train_parts(pipe: Any, items: list[Concept], parts: list, earlier: list[Patch],
                 progress: bool, sequential: bool = False) -> Patch:
    """Each part trained on the base model (with `earlier` applied), scaled, then combined;
    `sequential`: each part also with the parts before it applied."""
    trained: list = []
    carried: list[Patch] = []  # a sequential recipe's parts so far, as LoRAs
    for part, cfg in parts:
        mine = [c for c in items if part.takes(c)]  # a part may be for one kind of concept
        if not mine:
            continue
        if earlier:
            cfg = _on_top_config(cfg, earlier, mine)
        if carried:
            # its retention terms compare with the base model, not the model the parts made
            cfg = dataclasses.replace(cfg, compare_without=(
                *cfg.compare_without, *(p.name for p in carried)))
        patch = _with_applied(pipe, [*earlier, *carried],
                              lambda c=cfg, p=part, m=mine: methods.get(p.method).train(
                                  pipe, m, c, progress=progress))
        if earlier:
            patch.metadata["trained_on_top_of"] = [p.name for p in earlier]
        scaled = (dataclasses.replace(patch.scaled(part.scale), name=patch.name)
                  if part.scale != 1.0 else patch)
        scaled.metadata.pop("strength", None)  # the part's share is recorded as its scale
        trained.append((part, scaled))
        if sequential and len(trained) < len(parts):
            carried.append(_as_lora(scaled))
    return _combined(trained)


def _as_lora(patch: Patch) -> Patch:
    """A sequential recipe's earlier part as a LoRA, which a later part can switch off by
    adapter name: a weight delta becomes a LoRA of full rank, which is exact (UCE stores one
    when its edit's rank reaches a weight's width)."""
    from forget_me_not.patch.ops import extract_lora

    if patch.kind == "delta" and not patch.has_rows:
        full = max(min(t.flatten(1).shape) for t in patch.unet_tensors.values()
                   if t.ndim in (2, 4))
        lora = extract_lora(patch, full, convolutions=True)
        extraction = lora.metadata["extraction"]
        if not extraction["dropped"] and extraction["overall_relative_error"] <= 1e-4:
            return lora
    if patch.kind != "lora" or patch.has_rows:
        raise FmnError(f"a sequential recipe's later parts train on top of LoRA parts, but part "
                       f"{patch.metadata.get('method')} made a {patch.kind} patch that no LoRA "
                       "carries exactly: put that part last")
    return patch


def _on_top_config(cfg: Any, earlier: list[Patch], items: list[Concept]) -> Any:
    done = [Concept.from_dict(c) for p in earlier for c in p.metadata.get("concepts", [])]
    return dataclasses.replace(
        cfg,
        compare_without=(*cfg.compare_without, *(p.name for p in earlier)),
        also_avoid=tuple(dict.fromkeys(
            [*cfg.also_avoid, *(c.words for c in done), *(c.words for c in items)])),
        hold_prompts=tuple(dict.fromkeys(
            [*cfg.hold_prompts, *(q for c in done for q in c.prompts())])),
    )


def _with_applied(pipe: Any, earlier: list[Patch], run: Any) -> Patch:
    applied: list[Patch] = []
    try:
        for p in earlier:
            p.apply(pipe)
            applied.append(p)
        return run()
    finally:
        for p in reversed(applied):
            p.remove(pipe)


def _combined(trained: list) -> Patch:
    """One patch from the parts: a UNet part carries the token rows of a rows part beside it."""
    records = [{"method": part.method, "scale": part.scale, "source": part.source,
                "settings": patch.metadata.get("settings"), "losses": patch.metadata["losses"],
                "term_losses": patch.metadata.get("term_losses", {}),
                "seconds": patch.metadata.get("seconds")} for part, patch in trained]
    patches = [patch for _, patch in trained]
    unet = [p for p in patches if p.kind != "embedding"]
    rows = [p for p in patches if p.kind == "embedding"]
    if len(patches) == 1:
        patch = patches[0]
    elif len(unet) == 1 and len(rows) == 1 and not unet[0].has_rows:
        first = unet[0]
        patch = Patch(first.kind, {**first.tensors, **rows[0].tensors}, dict(first.metadata),
                      first.lora_config, adapter_name(f"{first.name}_rows"))
    else:
        patch = stack_patches(patches)
        named = {c["name"]: c for c in patch.metadata["concepts"]}  # each part forgot them all
        # the losses shown are the last part's that trains in steps (a closed form has one)
        losses = next((p.metadata["losses"] for p in reversed(patches)
                       if len(p.metadata["losses"]) > 1), patches[-1].metadata["losses"])
        patch.metadata.update({"concepts": list(named.values()), "losses": list(losses)})
    patch.metadata.update({
        "method": "+".join(r["method"] for r in records),
        "recipe_parts": records,
        "seconds": round(sum(r["seconds"] or 0.0 for r in records), 3),
    })
    return patch


def _stacked(parts: list[Patch], items: list[Concept]) -> Patch:
    stacked = stack_patches(parts)
    first = parts[0].metadata
    stacked.metadata.update({
        "concepts": [c.to_dict() for c in items],
        "method": first.get("method"),
        "train": first.get("train"),
        "steps": sum(p.metadata.get("steps") or 0 for p in parts),
        "seed": first.get("seed"),
        "settings": first.get("settings"),
        "recipe_parts": first.get("recipe_parts"),
        "losses": [x for p in parts for x in p.metadata["losses"]],
        "seconds": round(sum(p.metadata.get("seconds", 0.0) for p in parts), 3),
        "separately": True,
    })
    return stacked


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
    Extra options (templates, batch_size, norm_target, init_sigma, weight_decay, flip_p,
    mixed_precision) go to `inversion.train_inversion`.
    """
    return train_inversion(pipe, images, num_tokens=num_tokens, init_words=init_words,
                           steps=steps, lr=lr, seed=seed, progress=progress, **options)
