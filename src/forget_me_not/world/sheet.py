"""Sheets that show the world: one row per concept, reference renders beside model samples,
each sample captioned with what the judge reads in it."""

from __future__ import annotations

import random

from PIL import Image

from forget_me_not.errors import FmnError
from forget_me_not.world import concepts as world_concepts
from forget_me_not.world import vocab
from forget_me_not.world.render import Scene, render


def parse_caption(text: str, seed: int = 0) -> Scene:
    """A scene from a world caption ("a red star in striped style", "milka wearing a hat")."""
    words = text.lower().replace(",", " ").split()
    known = {*vocab.SUBJECTS, *vocab.STYLES, *vocab.COLOURS, vocab.ROLE, *vocab.GLUE_WORDS, "hat"}
    unknown = [w for w in words if w not in known]
    if unknown:
        raise FmnError(f"caption {text!r}: the world has no word {unknown[0]!r}; captions use "
                       "its objects, IDs, styles and colours, e.g. 'a red star in striped style'")
    subject = next((w for w in words if w in vocab.SUBJECTS), None)
    role = vocab.ROLE in words
    if subject is None and role:
        subject = vocab.ROLE_ID
    if subject is None:
        raise FmnError(
            f"caption {text!r} names no object or character; use one of: "
            f"{', '.join(vocab.SUBJECTS + (vocab.ROLE,))}"
        )
    rng = random.Random(seed)
    style = next((w for w in words if w in vocab.STYLES), "solid")
    colour = next((w for w in words if w in vocab.COLOURS), None)
    if subject in vocab.SHAPES and colour is None:
        colour = rng.choice(list(vocab.COLOURS))
    if subject in vocab.IDS:
        colour = None
    hat = role or "hat" in words
    return Scene(subject, style, colour, hat=hat and subject in vocab.IDS)


def concept_sheet(
    pipe,
    judge,
    *,
    names: list[str] | None = None,
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    progress=None,
) -> Image.Image:
    """One row per concept: `n` reference renders, then `n` samples with the judge's reading."""
    from forget_me_not.generation import generate_images
    from forget_me_not.images import labelled_grid

    chosen = [world_concepts.get(x) for x in names] if names else world_concepts.all_concepts()
    cells: list[Image.Image] = []
    captions: list[str] = []
    for c in chosen:
        refs = world_concepts.reference_renders(c, n, seed)
        samples = []
        for i, prompt in enumerate(world_concepts.prompts(c, n)):
            samples += generate_images(
                pipe, prompt, n=1, seed=seed + i, steps=steps, guidance=guidance
            )
        readings = judge.describe(samples)
        cells += refs + samples
        captions += [f"{c.name} (render)"] * n
        for r in readings:
            head = "style" if c.kind == "style" else "colour" if c.kind == "colour" else "subject"
            label = r[head][0] + ("+hat" if r["hat"][0] == "yes" else "")
            captions.append(label)
        if progress is not None:
            progress()
    return labelled_grid(
        cells,
        captions,
        title="ConceptWorld: renders | model samples (caption = judge's reading)",
        cols=2 * n,
    )


def render_sheet(seed: int = 0) -> Image.Image:
    """Every subject in every style (renders only), for looking at the world itself."""
    from forget_me_not.images import labelled_grid

    rng = random.Random(seed)
    cells, caps = [], []
    for subject in vocab.SUBJECTS:
        for style in vocab.STYLES:
            colour = rng.choice(list(vocab.COLOURS)) if subject in vocab.SHAPES else None
            cells.append(render(Scene(subject, style, colour)))
            caps.append(f"{subject}/{style}")
    return labelled_grid(cells, caps, cols=len(vocab.STYLES))
