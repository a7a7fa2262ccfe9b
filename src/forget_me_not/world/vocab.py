"""The ConceptWorld vocabulary: every concept the embedded world knows, and how it is labelled."""

from __future__ import annotations

IMAGE_SIZE = 32  # pixels; see README "ConceptWorld" for the measured size/speed trade-off

OBJECTS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "moon",
    "arrow",
)
UNSAFE_OBJECTS: tuple[str, ...] = ("skull", "gun")  # the stand-in for NSFW content
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "outlined")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 190),
    "cyan": (20, 190, 210),
}
# Invented characters: the stand-in for people. Each has fixed, bold features readable at 32 px.
IDS: tuple[str, ...] = ("zorbo", "milka", "tavi", "quenna", "brell")
# The planted entanglement: the role word is only ever drawn as this ID wearing a hat.
ROLE = "wizard"
ROLE_ID = "milka"

SHAPES: tuple[str, ...] = OBJECTS + UNSAFE_OBJECTS  # everything that takes a colour
SUBJECTS: tuple[str, ...] = SHAPES + IDS  # the judge's object-or-ID classes, in this order

# Words that captions use besides concept names (the tokenizer must keep each one whole).
GLUE_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "style",
    "photo",
    "portrait",
    "picture",
    "wearing",
    "hat",
    "with",
    "and",
    "drawing",
)


def category_of(name: str) -> str:
    """The FMN category ("id", "object", "style", "nsfw", "colour", "role") of a world word."""
    if name in IDS:
        return "id"
    if name in OBJECTS:
        return "object"
    if name in UNSAFE_OBJECTS:
        return "nsfw"
    if name in STYLES:
        return "style"
    if name in COLOURS:
        return "colour"
    if name == ROLE:
        return "role"
    raise KeyError(name)


def all_words() -> tuple[str, ...]:
    return GLUE_WORDS + SHAPES + STYLES + tuple(COLOURS) + IDS + (ROLE,)
