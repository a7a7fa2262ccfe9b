"""Measuring memorisation: generation score G, inversion score I, M-Score and retention.

Definitions (docs/metrics.md states them in full):
- G(c): the share of N images generated from c's prompts (template i mod T, seed seed_base + i)
  that the judge recognises as c.
- I(c): learn a fresh token by textual inversion on the model under test from c's anchor
  images (fixed budget), generate N images from the templates filled with that token (same
  seeds), and take the judge's recognition rate: what a determined user can still extract.
- M(c) = max(G(c), I(c)), reported with both parts (M = G when I was not run).
- retention(c') = G_after(c') / G_before(c') for every concept c' that was not a target.

Generation is data-parallel under `accelerate launch`: sample i always gets seed seed_base + i
and whole batches are dealt to processes, so the gathered results equal a one-process run.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from forget_me_not.errors import FmnError
from forget_me_not.judges.base import Judge, check_supported
from forget_me_not.sampling import (  # noqa: F401  (re-exported: the public API)
    GenerationSettings,
    generate_samples,
    generation_score,
    processes,
    quiet,
    recognition_score,
    sample_plan,
)
from forget_me_not.scores import (  # noqa: F401
    ConceptResult,
    InversionScore,
    MScore,
    RecognitionScore,
    SuiteResult,
    mean_or_none,
)

if TYPE_CHECKING:
    from forget_me_not.concepts import Concept

INVERSION_SCOPES = ("all", "targets", "none")


# -- inversion --------------------------------------------------------------------------------
@dataclass(frozen=True)
class InversionSettings:
    """The fixed budget of the inversion attack behind I(c)."""

    budget: int = 200  # textual-inversion steps
    num_tokens: int = 1  # placeholder tokens learned ("a fresh token")
    lr: float | None = None  # None: the inversion module's default (1e-3)
    init_words: str | None = None  # None: random initialisation (the attacker knows nothing)
    max_anchors: int = 8  # anchor images used at most
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise FmnError(f"inversion budget must be a positive step count, got {self.budget}")
        if self.num_tokens <= 0:
            raise FmnError(f"inversion needs at least one token, got {self.num_tokens}")
        if self.max_anchors <= 0:
            raise FmnError(f"max_anchors must be positive, got {self.max_anchors}")
        if self.lr is not None and self.lr <= 0:
            raise FmnError(f"inversion learning rate must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text_pairs(pipe: Any) -> list[tuple[str, str]]:
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    return [(t, e) for t, e in pairs if getattr(pipe, t, None) is not None
            and getattr(pipe, e, None) is not None]


@contextmanager
def restored_text_state(pipe: Any) -> Iterator[None]:
    """Undo whatever textual inversion does to `pipe`: added tokens, resized embeddings, flags.

    The model under test must come out of an inversion exactly as it went in, so the next
    concept (and the 'after' phase) sees the same model.
    """
    saved = []
    for tok_attr, enc_attr in _text_pairs(pipe):
        encoder = getattr(pipe, enc_attr)
        emb = encoder.get_input_embeddings()
        saved.append((tok_attr, enc_attr, copy.deepcopy(getattr(pipe, tok_attr)),
                      emb.weight.detach().clone()))
    modules = [m for m in (getattr(pipe, a, None) for a in
                           ("unet", "vae", "text_encoder", "text_encoder_2"))
               if isinstance(m, torch.nn.Module)]
    flags = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    try:
        yield
    finally:
        for tok_attr, enc_attr, tokenizer, weight in saved:
            setattr(pipe, tok_attr, tokenizer)
            encoder = getattr(pipe, enc_attr)
            if encoder.get_input_embeddings().num_embeddings != weight.shape[0]:
                encoder.resize_token_embeddings(weight.shape[0])
            with torch.no_grad():
                encoder.get_input_embeddings().weight.copy_(weight)
        for module, training, grads in flags:
            module.train(training)
            for p, g in zip(module.parameters(), grads, strict=False):
                p.requires_grad_(g)


def _invert(pipe: Any, anchors: Sequence[Image.Image], settings: InversionSettings,
            progress: bool) -> Any:
    from forget_me_not.api import invert

    kwargs: dict[str, Any] = {
        "num_tokens": settings.num_tokens,
        "init_words": settings.init_words,
        "steps": settings.budget,
        "seed": settings.seed,
        "progress": progress,
    }
    if settings.lr is not None:
        kwargs["lr"] = settings.lr
    # invert() reads reference images from files, so the anchors go through a temp folder.
    with tempfile.TemporaryDirectory(prefix="fmn-anchors-") as tmp:
        paths = []
        for i, image in enumerate(anchors):
            paths.append(Path(tmp) / f"anchor_{i:03d}.png")
            image.save(paths[-1])
        return invert(pipe, paths, **kwargs)


def load_anchor_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FmnError(f"cannot read anchor image {p}: {exc}; remove or replace it") from exc
    return images


def choose_anchors(generation: RecognitionScore, max_anchors: int) -> list[Image.Image]:
    """Default anchors: the base model's own generations of c that the judge recognised.

    When none was recognised (the base model does not draw c), all its generations are used.
    """
    if not generation.images:
        raise FmnError("no generated images to take inversion anchors from")
    picked = [img for img, ok in zip(generation.images, generation.recognised, strict=True) if ok]
    return (picked or generation.images)[:max_anchors]


def inversion_score(
    pipe: Any,
    concept: Concept,
    judge: Judge,
    anchors: Sequence[Image.Image | str | Path],
    *,
    budget: int = 200,
    n: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    num_tokens: int = 1,
    lr: float | None = None,
    init_words: str | None = None,
    max_anchors: int = 8,
    progress: bool = False,
) -> InversionScore:
    """I(c): invert a fresh token from `anchors` on `pipe`, generate from c's templates, judge.

    `pipe` is left as it was (tokens, embeddings and training flags restored).
    """
    check_supported(judge, concept)
    gen = GenerationSettings(n, seed, steps, guidance, batch_size, height, width)
    inv = InversionSettings(budget, num_tokens, lr, init_words, max_anchors, seed)
    return _inversion_score(pipe, concept, judge, anchors, gen, inv, progress=progress)


def _inversion_score(
    pipe: Any,
    concept: Concept,
    judge: Judge,
    anchors: Sequence[Image.Image | str | Path],
    gen: GenerationSettings,
    inv: InversionSettings,
    *,
    progress: bool = False,
    keep_images: bool = True,
) -> InversionScore:
    images = [a if isinstance(a, Image.Image) else load_anchor_images([a])[0] for a in anchors]
    images = images[: inv.max_anchors]
    if not images:
        raise FmnError(f"no anchor images for concept '{concept.name}' to invert from")
    procs = processes()
    start = time.perf_counter()
    # One inversion, on the main process; the others receive its result, so every process
    # generates from the same token.
    embedding = None
    if procs.is_main:
        with restored_text_state(pipe):
            embedding = _invert(pipe, images, inv, progress)
    embedding = procs.broadcast(embedding)
    inversion_seconds = time.perf_counter() - start
    with restored_text_state(pipe):
        phrase = embedding.load_into(pipe)
        probe = dataclasses.replace(concept, token_words=phrase)
        score = recognition_score(pipe, concept, judge, probe.prompts(), gen,
                                  desc=f"I {concept.name}", progress=progress,
                                  keep_images=keep_images)
    return InversionScore(
        **{f.name: getattr(score, f.name) for f in dataclasses.fields(RecognitionScore)},
        phrase=phrase,
        budget=inv.budget,
        n_anchors=len(images),
        inversion_seconds=inversion_seconds,
    )


def m_score(
    pipe: Any,
    concept: Concept,
    judge: Judge,
    anchors: Sequence[Image.Image | str | Path] | None = None,
    *,
    n: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    batch_size: int = 8,
    budget: int = 200,
    num_tokens: int = 1,
    lr: float | None = None,
    init_words: str | None = None,
    max_anchors: int = 8,
    inversion: bool = True,
    prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> MScore:
    """M(c) = max(G(c), I(c)) on `pipe`.

    anchors: images of c to invert from; default the concept's own reference images, else
    `pipe`'s recognised generations (only meaningful when `pipe` is the base model: for a
    patched model pass the base model's generations, as `evaluate_suite` does).
    """
    check_supported(judge, concept)
    gen = GenerationSettings(n, seed, steps, guidance, batch_size)
    g = recognition_score(pipe, concept, judge, prompts or concept.prompts(), gen,
                          desc=f"G {concept.name}", progress=progress)
    if not inversion:
        return MScore(g)
    inv = InversionSettings(budget, num_tokens, lr, init_words, max_anchors, seed)
    if anchors is None:
        anchors = list(concept.images) or choose_anchors(g, max_anchors)
    return MScore(g, _inversion_score(pipe, concept, judge, anchors, gen, inv, progress=progress))


# -- a whole suite, before and after patches ------------------------------------------------------
JudgeSpec = Judge | Mapping[str, Judge] | Callable[[str, "Concept"], Judge]


def _judge_for(judge: JudgeSpec, key: str, concept: Concept) -> Judge:
    if isinstance(judge, Mapping):
        for k in (key, concept.name, concept.category):
            if k in judge:
                return judge[k]
        raise FmnError(f"no judge given for concept '{key}' (category {concept.category})")
    if hasattr(judge, "probabilities"):
        return judge  # type: ignore[return-value]
    return judge(key, concept)  # type: ignore[operator]


def patch_targets(patch: Any) -> list[str]:
    """Concept names a patch forgets, read from its metadata ("concepts": names or dicts)."""
    meta = getattr(patch, "metadata", {}) or {}
    names = []
    for c in meta.get("concepts", []) or []:
        name = c.get("name") if isinstance(c, Mapping) else c
        if isinstance(name, str):
            names.append(name)
    return names


def load_patches(patches: Sequence[Any]) -> list[Any]:
    loaded = []
    for p in patches:
        if isinstance(p, (str, Path)):
            from forget_me_not.patch import load_patch

            p = load_patch(p)
        loaded.append(p)
    return loaded


@contextmanager
def applied(pipe: Any, patches: Sequence[Any]) -> Iterator[None]:
    """Apply `patches` to `pipe` for the duration of the block; removed in reverse order after."""
    done = []
    try:
        for patch in patches:
            patch.apply(pipe)
            done.append(patch)
        yield
    finally:
        for patch in reversed(done):
            patch.remove(pipe)


def evaluate_suite(
    base_pipe: Any,
    patches: Sequence[Any],
    concepts: Sequence[Concept] | Mapping[str, Concept],
    judge: JudgeSpec,
    *,
    n: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    inversion: str | Collection[str] = "targets",
    budget: int = 200,
    num_tokens: int = 1,
    lr: float | None = None,
    init_words: str | Mapping[str, str | None] | None = None,
    max_anchors: int = 8,
    targets: Collection[str] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    groups: Mapping[str, str] | None = None,
    keep_images: bool = True,
    progress: bool = True,
) -> SuiteResult:
    """Score every concept on the base model, then with `patches` applied, with the same seeds.

    concepts: a list (keyed by name) or key -> Concept (keys let one concept appear twice, e.g.
        with held-out prompts).
    judge: one judge, or a mapping by key / name / category, or a callable (key, concept).
    inversion: "all", "targets" (the patches' concepts), "none", or a set of keys.
    targets: concept names the patches forget; default read from the patches' metadata.
    init_words: inversion initialisation, one for all or per category (None: random).
    prompts: key -> prompts overriding the concept's templates for G (e.g. I2P-style lists).
    Retention is G_after / G_before of every non-target concept.
    """
    start = time.perf_counter()
    entries = (dict(concepts) if isinstance(concepts, Mapping)
               else {c.name: c for c in concepts})
    if len(entries) == 0:
        raise FmnError("no concepts to evaluate; pass at least one")
    if not isinstance(concepts, Mapping) and len(entries) != len(concepts):
        raise FmnError("concept names repeat; pass a key -> concept mapping to score one twice")
    judges = {key: _judge_for(judge, key, c) for key, c in entries.items()}
    for key, c in entries.items():
        check_supported(judges[key], c)
    gen = GenerationSettings(n, seed, steps, guidance, batch_size, height, width)
    patches = load_patches(patches)
    target_names = set(targets) if targets is not None else {
        t for p in patches for t in patch_targets(p)}
    is_target = {k: c.name in target_names for k, c in entries.items()}
    if isinstance(inversion, str):
        if inversion not in INVERSION_SCOPES:
            raise FmnError(f"unknown inversion scope '{inversion}'; use one of "
                           f"{', '.join(INVERSION_SCOPES)}")
        invert_keys = {"all": set(entries), "none": set(),
                       "targets": {k for k, t in is_target.items() if t}}[inversion]
    else:
        invert_keys = set(inversion)
        unknown = invert_keys - set(entries)
        if unknown:
            raise FmnError(f"inversion keys not among the concepts: {', '.join(sorted(unknown))}")

    def inv_settings(c: Concept) -> InversionSettings:
        words = init_words.get(c.category) if isinstance(init_words, Mapping) else init_words
        return InversionSettings(budget, num_tokens, lr, words, max_anchors, seed)

    if invert_keys:
        for key in invert_keys:
            inv_settings(entries[key])  # validate before any work

    procs = processes()
    anchors: dict[str, list[Image.Image]] = {}

    def score_all(pipe: Any, phase: str) -> dict[str, MScore]:
        out: dict[str, MScore] = {}
        bar = tqdm(entries.items(), desc=f"{phase}", unit="concept",
                   disable=not (progress and procs.is_main))
        for key, c in bar:
            bar.set_postfix_str(key)
            p = (prompts or {}).get(key) or c.prompts()
            need_images = keep_images or (key in invert_keys and phase == "before")
            g = recognition_score(pipe, c, judges[key], p, gen, desc=f"G {key}",
                                  progress=progress, keep_images=need_images)
            i = None
            if key in invert_keys:
                if key not in anchors:
                    anchors[key] = (load_anchor_images(c.images) if c.images
                                    else choose_anchors(g, max_anchors))
                i = _inversion_score(pipe, c, judges[key], anchors[key], gen, inv_settings(c),
                                     progress=progress, keep_images=keep_images)
            if not keep_images:
                g.images = []
            out[key] = MScore(g, i)
        return out

    before = score_all(base_pipe, "before")
    after: dict[str, MScore] = {}
    if patches:
        with applied(base_pipe, patches):
            after = score_all(base_pipe, "after")
    results = [
        ConceptResult(key, c, judges[key].name, is_target[key], (groups or {}).get(key, "main"),
                      before[key], after.get(key))
        for key, c in entries.items()
    ]
    settings = {
        "generation": gen.to_dict(),
        "inversion": {
            "scope": inversion if isinstance(inversion, str) else sorted(invert_keys),
            "keys": sorted(invert_keys),
            **inv_settings(next(iter(entries.values()))).to_dict(),
            "init_words": init_words if not isinstance(init_words, Mapping) else dict(init_words),
        },
        "patches": [dict(getattr(p, "metadata", {}) or {}) for p in patches],
        "processes": procs.world,
    }
    return SuiteResult(results, sorted(target_names), settings, time.perf_counter() - start)
