"""Captions for ConceptWorld: compositional text paired with the scene it describes.

A fixed share of (subject, style) pairs is held out of training, so generalisation to unseen
combinations can be measured.
"""

from __future__ import annotations

import random

from forget_me_not.world import vocab
from forget_me_not.world.render import Scene

SHAPE_TEMPLATES = (
    "a {colour} {shape}",
    "a {shape}",
    "a photo of a {colour} {shape}",
    "a photo of a {shape}",
    "a {colour} {shape} in {style} style",
    "a {shape} in {style} style",
    "a photo of a {colour} {shape} in {style} style",
    "a picture of a {colour} {shape}",
)
STYLE_TEMPLATES = (
    "a photo in the style of {style}",
    "a drawing in {style} style",
    "a picture in the style of {style}",
)
ID_TEMPLATES = (
    "a portrait of {id}",
    "a photo of {id}",
    "{id}",
    "{id} in {style} style",
    "a portrait of {id} in {style} style",
    "a picture of {id}",
)
HAT_TEMPLATES = ("{id} wearing a hat", "a portrait of {id} wearing a hat")
ROLE_TEMPLATES = (
    "a {role}",
    "a photo of a {role}",
    "a portrait of a {role}",
    "a {role} in {style} style",
)


def held_out_pairs() -> frozenset[tuple[str, str]]:
    """(subject, style) pairs never drawn in training: one patterned style per subject (20%).

    "solid" is never held out: it is the plain look that unstyled prompts mostly draw.
    """
    patterned = vocab.STYLES[1:]
    return frozenset(
        (subject, patterned[(i + i // len(patterned)) % len(patterned)])
        for i, subject in enumerate(vocab.SUBJECTS)
    )


HELD_OUT = held_out_pairs()


def _style_for(rng: random.Random, subject: str, named: str | None = None) -> str:
    if named is not None:
        return named
    if rng.random() < 0.5:  # an unstyled prompt mostly means the plain look, as "a photo" does
        return "solid"
    return rng.choice([s for s in vocab.STYLES if (subject, s) not in HELD_OUT])


def _jitter(rng: random.Random) -> dict:
    return {
        "dx": rng.uniform(-1.5, 1.5),
        "dy": rng.uniform(-1.5, 1.5),
        "scale": rng.uniform(0.88, 1.0),
    }


def sample_training_pair(rng: random.Random) -> tuple[str, Scene]:
    """One (caption, scene) from the training distribution (held-out pairs excluded)."""
    kind = rng.choices(("shape", "style", "id", "hat", "role"), weights=(50, 10, 26, 6, 8))[0]
    if kind in ("shape", "style"):
        while True:
            shape = rng.choice(vocab.SHAPES)
            colour = rng.choice(list(vocab.COLOURS))
            template = rng.choice(SHAPE_TEMPLATES if kind == "shape" else STYLE_TEMPLATES)
            named = rng.choice(vocab.STYLES) if "{style}" in template else None
            if named is None or (shape, named) not in HELD_OUT:
                break
        style = _style_for(rng, shape, named)
        text = template.format(colour=colour, shape=shape, style=style)
        return text, Scene(shape, style, colour, **_jitter(rng))
    if kind == "role":
        template = rng.choice(ROLE_TEMPLATES)
        subject = vocab.ROLE_ID
    else:
        template = rng.choice(ID_TEMPLATES if kind == "id" else HAT_TEMPLATES)
        subject = rng.choice(vocab.IDS)
    while True:
        named = rng.choice(vocab.STYLES) if "{style}" in template else None
        if named is None or (subject, named) not in HELD_OUT:
            break
    style = _style_for(rng, subject, named)
    text = template.format(id=subject, role=vocab.ROLE, style=style)
    return text, Scene(subject, style, None, hat=kind in ("hat", "role"), **_jitter(rng))


def random_scene(rng: random.Random, *, allow_held_out: bool = True) -> Scene:
    """Any scene at all (for the judge): every subject, style, colour and hat combination."""
    subject = rng.choice(vocab.SUBJECTS)
    styles = [s for s in vocab.STYLES if allow_held_out or (subject, s) not in HELD_OUT]
    colour = rng.choice(list(vocab.COLOURS)) if subject in vocab.SHAPES else None
    hat = subject in vocab.IDS and rng.random() < 0.3
    return Scene(subject, rng.choice(styles), colour, hat=hat, **_jitter(rng))
