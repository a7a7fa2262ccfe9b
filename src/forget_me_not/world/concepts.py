"""ConceptWorld's concepts as evaluation and forgetting sees them: prompts and reference renders.

Prompts are drawn from the same caption forms the model was trained on, cycling through colours
and styles (held-out pairs excluded, except in `held_out_prompts`), so a concept's score is an
average over the ways it is asked for.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from forget_me_not.world import vocab
from forget_me_not.world.captions import HELD_OUT, sample_training_pair
from forget_me_not.world.render import Scene, render

# FMN category per world kind ("colour" and "role" have none in the paper; they are measured).
FMN_CATEGORY = {
    "object": "object",
    "nsfw": "nsfw",
    "id": "id",
    "style": "style",
    "colour": "object",
    "role": "id",
}


@dataclass(frozen=True)
class WorldConcept:
    name: str
    kind: str  # object | nsfw | id | style | colour | role

    @property
    def category(self) -> str:
        return FMN_CATEGORY[self.kind]


def all_concepts() -> list[WorldConcept]:
    return (
        [WorldConcept(n, "object") for n in vocab.OBJECTS]
        + [WorldConcept(n, "nsfw") for n in vocab.UNSAFE_OBJECTS]
        + [WorldConcept(n, "id") for n in vocab.IDS]
        + [WorldConcept(n, "style") for n in vocab.STYLES]
        + [WorldConcept(n, "colour") for n in vocab.COLOURS]
        + [WorldConcept(vocab.ROLE, "role")]
    )


def get(name: str) -> WorldConcept:
    for c in all_concepts():
        if c.name == name:
            return c
    valid = ", ".join(c.name for c in all_concepts())
    from forget_me_not.errors import FmnError

    raise FmnError(f"'{name}' is not a ConceptWorld concept; choose one of: {valid}")


def _trained_styles(subject: str) -> list[str]:
    return [s for s in vocab.STYLES if (subject, s) not in HELD_OUT]


def prompts(concept: WorldConcept, n: int, avoid: Sequence[str] = ()) -> list[str]:
    """`n` prompts that ask for the concept, in the trained caption forms.

    `avoid`: words no prompt may contain besides the concept's own name (when a forgotten
    concept's retention is measured, "a blue star" must not count against "blue").
    """
    banned = {w for w in avoid if w != concept.name}
    out: list[str] = []
    colours = list(vocab.COLOURS)
    i = 0
    while len(out) < n:
        if i > 50 * (n + len(vocab.SHAPES)):
            raise ValueError(f"no prompt for {concept.name!r} avoids {sorted(banned)}")
        c = colours[i % len(colours)]
        if concept.kind in ("object", "nsfw"):
            s = _trained_styles(concept.name)[i % len(_trained_styles(concept.name))]
            forms = (
                f"a {c} {concept.name}",
                f"a photo of a {concept.name}",
                f"a {c} {concept.name} in {s} style",
            )
        elif concept.kind == "id":
            s = _trained_styles(concept.name)[i % len(_trained_styles(concept.name))]
            forms = (
                f"a portrait of {concept.name}",
                f"a photo of {concept.name}",
                f"{concept.name} in {s} style",
            )
        elif concept.kind == "style":
            shapes = [o for o in vocab.SHAPES if (o, concept.name) not in HELD_OUT]
            o = shapes[i % len(shapes)]
            forms = (
                f"a {c} {o} in {concept.name} style",
                f"a photo in the style of {concept.name}",
            )
        elif concept.kind == "colour":
            o = vocab.SHAPES[i % len(vocab.SHAPES)]
            forms = (f"a {concept.name} {o}", f"a photo of a {concept.name} {o}")
        else:  # role
            forms = (
                f"a {vocab.ROLE}",
                f"a photo of a {vocab.ROLE}",
                f"a portrait of a {vocab.ROLE}",
            )
        form = forms[i % len(forms)]
        i += 1
        if not banned & set(form.split()):
            out.append(form)
    return out


def held_out_prompts() -> list[tuple[str, str]]:
    """(subject, prompt) for every held-out (subject, style) pair: never seen in training."""
    out = []
    for i, (subject, style) in enumerate(sorted(HELD_OUT)):
        if subject in vocab.IDS:
            out.append((subject, f"{subject} in {style} style"))
        else:
            colour = list(vocab.COLOURS)[i % len(vocab.COLOURS)]
            out.append((subject, f"a {colour} {subject} in {style} style"))
    return out


def reference_scenes(concept: WorldConcept, n: int, seed: int = 0) -> list[Scene]:
    """`n` training scenes that show the concept (the role: its ID wearing the hat)."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        _, scene = sample_training_pair(rng)
        if concept.kind in ("object", "nsfw", "id"):
            keep = scene.subject == concept.name and not scene.hat
        elif concept.kind == "style":
            keep = scene.style == concept.name
        elif concept.kind == "colour":
            keep = scene.colour == concept.name
        else:
            keep = scene.subject == vocab.ROLE_ID and scene.hat
        if keep:
            scenes.append(scene)
    return scenes


def reference_renders(concept: WorldConcept, n: int, seed: int = 0) -> list[Image.Image]:
    """`n` renders showing the concept (the reference images forgetting and inversion use)."""
    return [render(scene) for scene in reference_scenes(concept, n, seed)]


def role_references(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` RGBA renders of the role as training draws it (its ID wearing the hat), for
    correction: opaque where the picture shows the ID, transparent over the hat (and the
    hair it covers), so re-steering moves the role away from the ID and leaves the hat."""
    images: list[Image.Image] = []
    for scene in reference_scenes(get(vocab.ROLE), n, seed):
        with_hat = np.asarray(render(scene), dtype=np.int16)
        without = np.asarray(render(dataclasses.replace(scene, hat=False)), dtype=np.int16)
        hat = np.abs(with_hat - without).max(axis=2) > 8  # (H, W) pixels the hat changed
        alpha = np.where(hat, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(np.dstack([with_hat.astype(np.uint8), alpha])))
    return images


def render_scene(scene: Scene) -> Image.Image:
    return render(scene)


# The paper's templates in the world's own phrasing ("a photo of a star", not "a photo of star").
FMN_TEMPLATES = {
    "object": ("a photo of a {}", "a {}"),
    "nsfw": ("a photo of a {}", "a {}"),
    "id": ("a photo of {}", "a portrait of {}"),
    "style": ("a photo in the style of {}", "a drawing in {} style",
              "a picture in the style of {}"),
    "colour": ("a {} circle", "a {} star"),
    "role": ("a {}", "a photo of a {}", "a portrait of a {}"),
}


def fmn_concept(name: str, ref_dir, n_refs: int = 10, seed: int = 0):
    """A `Concept` to forget, with `n_refs` reference renders written (as PNG) into `ref_dir`."""
    from forget_me_not.concepts import Concept
    from forget_me_not.images import save_numbered

    wc = get(name)
    paths = save_numbered(reference_renders(wc, n_refs, seed), ref_dir, name)
    templates = style_templates(name) if wc.kind == "style" else FMN_TEMPLATES[wc.kind]
    return Concept(name, wc.category, templates, paths, anchor=anchor_of(wc))


# Subjects a style is re-steered on besides the subject-less forms: the model draws most styled
# pictures with a subject. Pairs held out of training are skipped (they measure generalisation).
_STYLE_SUBJECTS = ("a red circle", "a blue square", "zorbo", "a green triangle", "a yellow heart",
                   "a portrait of milka", "a cyan cross", "a purple arrow", "brell")


def style_templates(style: str, n_subjects: int = 7) -> tuple[str, ...]:
    plain = FMN_TEMPLATES["style"]
    subjects = [s for s in _STYLE_SUBJECTS if (s.split()[-1], style) not in HELD_OUT]
    out = []
    for i, subject in enumerate(subjects[:n_subjects]):
        out += [plain[i % len(plain)], subject + " in {} style"]
    return tuple(out)


# What a forgotten style becomes: the plain look. On this model a style is carried by the
# end-of-text/padding states, so moving attention off its word alone only weakens it (README,
# "Why a style resists"); pulling its prompts toward the plain look's erases most of it.
STYLE_ANCHOR = "solid"


def anchor_of(concept: WorldConcept) -> str | None:
    if concept.kind == "style" and concept.name != STYLE_ANCHOR:
        return STYLE_ANCHOR
    return None


def retention_prompts(targets: list[str], per_kind: int = 2) -> tuple[str, ...]:
    """World prompts to keep intact while forgetting `targets` (none mentions a target)."""
    words = {w for t in targets for w in t.lower().split()}
    out: list[str] = []
    for c in all_concepts():
        if c.name in words:
            continue
        for p in prompts(c, per_kind):
            if not words & set(p.split()):
                out.append(p)
    return tuple(dict.fromkeys(out))
