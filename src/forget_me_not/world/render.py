"""Draw a ConceptWorld picture from a structured scene. Deterministic: same scene, same pixels.

Pictures are drawn at 4x the target size and downsampled, so edges are anti-aliased and the
features stay bold enough to read at 32 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from forget_me_not.world import vocab

SUPERSAMPLE = 4
BACKGROUND = (248, 248, 248)
HAT_COLOUR = (35, 35, 110)
HAT_BAND = (240, 200, 40)
INK = (25, 25, 25)
# Thin enough that narrow shapes (a crescent moon, a skull, an arrow's shaft) keep an empty
# inside: with a 3 px band their outlined and solid renders differed by under 1 grey level.
OUTLINE_PX = 1.5


@dataclass(frozen=True)
class Scene:
    """Everything a picture shows. `colour` is None for IDs (they keep their own palette)."""

    subject: str  # an object, unsafe object or ID
    style: str = "solid"
    colour: str | None = None
    hat: bool = False
    dx: float = 0.0  # offset in target pixels
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.subject not in vocab.SUBJECTS:
            raise ValueError(f"unknown subject {self.subject!r}")
        if self.style not in vocab.STYLES:
            raise ValueError(f"unknown style {self.style!r}")
        if self.subject in vocab.SHAPES and self.colour not in vocab.COLOURS:
            raise ValueError(
                f"shape {self.subject!r} needs one of the colours {list(vocab.COLOURS)}"
            )


# Each ID: face outline, skin, hair colour and cut, eyes. Distinct at a glance, like a person.
ID_LOOKS: dict[str, dict] = {
    "zorbo": {
        "face": "square",
        "skin": (165, 165, 170),
        "hair": (20, 20, 20),
        "cut": "flat",
        "eyes": "big",
    },
    "milka": {
        "face": "tall",
        "skin": (250, 165, 190),
        "hair": (120, 60, 20),
        "cut": "long",
        "eyes": "dots",
    },
    "tavi": {
        "face": "round",
        "skin": (225, 180, 130),
        "hair": (240, 110, 10),
        "cut": "spiky",
        "eyes": "lines",
    },
    "quenna": {
        "face": "hexagon",
        "skin": (130, 85, 50),
        "hair": (235, 235, 235),
        "cut": "bun",
        "eyes": "dots",
    },
    "brell": {
        "face": "wide",
        "skin": (245, 140, 60),
        "hair": (60, 30, 10),
        "cut": "beard",
        "eyes": "big",
    },
}


def _tint(rgb: tuple[int, int, int], amount: float = 0.62) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * amount) for c in rgb)  # type: ignore[return-value]


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list:
    out = []
    for k in range(points * 2):
        rad = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def _shape_mask(name: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """A white-on-black mask of a shape centred at (cx, cy) with half-extent r (hi-res px)."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        d.ellipse(box, fill=255)
    elif name == "square":
        d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=255)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif name == "star":
        d.polygon(_star(cx, cy + 0.08 * r, 1.05 * r), fill=255)
    elif name == "heart":
        lobe = 0.52 * r
        d.ellipse((cx - 2 * lobe, cy - 0.75 * r, cx, cy - 0.75 * r + 2 * lobe), fill=255)
        d.ellipse((cx, cy - 0.75 * r, cx + 2 * lobe, cy - 0.75 * r + 2 * lobe), fill=255)
        d.polygon(
            [(cx - 0.98 * r, cy - 0.1 * r), (cx + 0.98 * r, cy - 0.1 * r), (cx, cy + r)], fill=255
        )
    elif name == "cross":
        w = 0.34 * r
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
    elif name == "moon":
        d.ellipse(box, fill=255)
        d.ellipse((cx - 0.45 * r, cy - 1.05 * r, cx + 1.45 * r, cy + 0.75 * r), fill=0)
    elif name == "arrow":
        w = 0.22 * r
        d.rectangle((cx - r, cy - w, cx + 0.15 * r, cy + w), fill=255)
        d.polygon(
            [(cx + r, cy), (cx + 0.05 * r, cy - 0.7 * r), (cx + 0.05 * r, cy + 0.7 * r)], fill=255
        )
    elif name == "skull":
        d.ellipse((cx - 0.85 * r, cy - r, cx + 0.85 * r, cy + 0.55 * r), fill=255)
        d.rectangle((cx - 0.5 * r, cy + 0.2 * r, cx + 0.5 * r, cy + r), fill=255)
        e = 0.24 * r
        for ex in (cx - 0.38 * r, cx + 0.38 * r):  # eye sockets cut out of the mask
            d.ellipse((ex - e, cy - 0.3 * r - e, ex + e, cy - 0.3 * r + e), fill=0)
        d.polygon(
            [(cx, cy + 0.02 * r), (cx - 0.12 * r, cy + 0.25 * r), (cx + 0.12 * r, cy + 0.25 * r)],
            fill=0,
        )
        for tx in (-0.25, 0.0, 0.25):  # gaps between teeth
            d.rectangle(
                (cx + tx * r - 0.04 * r, cy + 0.62 * r, cx + tx * r + 0.04 * r, cy + r), fill=0
            )
    elif name == "gun":
        d.rectangle((cx - r, cy - 0.55 * r, cx + r, cy - 0.1 * r), fill=255)  # barrel + slide
        d.polygon(
            [
                (cx - 0.95 * r, cy - 0.2 * r),
                (cx - 0.35 * r, cy - 0.2 * r),
                (cx - 0.15 * r, cy + r),
                (cx - 0.75 * r, cy + r),
            ],
            fill=255,
        )  # grip
        d.rectangle((cx - 0.3 * r, cy - 0.1 * r, cx + 0.05 * r, cy + 0.3 * r), fill=255)  # guard
    elif name in ("round", "tall", "wide", "hexagon", "face-square"):
        if name == "round":
            d.ellipse((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=255)
        elif name == "tall":
            d.ellipse((cx - 0.62 * r, cy - 0.9 * r, cx + 0.62 * r, cy + 0.9 * r), fill=255)
        elif name == "wide":
            d.ellipse((cx - 0.95 * r, cy - 0.7 * r, cx + 0.95 * r, cy + 0.7 * r), fill=255)
        elif name == "hexagon":
            d.polygon(
                [
                    (cx + 0.85 * r * math.cos(a), cy + 0.85 * r * math.sin(a))
                    for a in (math.pi / 6 + k * math.pi / 3 for k in range(6))
                ],
                fill=255,
            )
        else:
            d.rounded_rectangle(
                (cx - 0.75 * r, cy - 0.8 * r, cx + 0.75 * r, cy + 0.8 * r), radius=0.2 * r, fill=255
            )
    else:
        raise ValueError(name)
    return m


def _pattern(style: str, size: int, mask: Image.Image, rgb: tuple[int, int, int]) -> Image.Image:
    """Paint the masked region in `style`: the colour plus a pale tint of it, on the background."""
    s = SUPERSAMPLE
    pale = _tint(rgb)
    fill = Image.new("RGB", (size, size), rgb)
    if style in ("striped", "dotted", "checkered"):
        fill = Image.new("RGB", (size, size), pale)
        d = ImageDraw.Draw(fill)
        if style == "striped":  # horizontal bands, 3 px of colour every 6 px
            for y in range(0, size, 6 * s):
                d.rectangle((0, y, size, y + 3 * s - 1), fill=rgb)
        elif style == "dotted":  # dots of 2.4 px every 6 px, offset rows
            rad = 1.2 * s
            for row, y in enumerate(range(2 * s, size, 6 * s)):
                for x in range((row % 2) * 3 * s + s, size, 6 * s):
                    d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=rgb)
        else:  # 4 px checkerboard
            cell = 4 * s
            for y in range(0, size, cell):
                for x in range(0, size, cell):
                    if (x // cell + y // cell) % 2 == 0:
                        d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=rgb)
    elif style == "outlined":  # a thin band along the edge, the inside left empty
        inner = mask.filter(ImageFilter.MinFilter(2 * round(OUTLINE_PX * s) + 1))
        mask = Image.fromarray(_subtract(mask, inner))
    img = Image.new("RGB", (size, size), BACKGROUND)
    img.paste(fill, (0, 0), mask)
    return img


def _subtract(a: Image.Image, b: Image.Image):
    import numpy as np

    return np.clip(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16), 0, 255).astype(
        np.uint8
    )


def _draw_face_features(
    d: ImageDraw.ImageDraw, look: dict, cx: float, cy: float, r: float, hat: bool
) -> None:
    hair = look["hair"]
    cut = look["cut"]
    top = cy - 0.85 * r
    if cut == "flat" and not hat:
        d.rectangle((cx - 0.8 * r, top - 0.15 * r, cx + 0.8 * r, top + 0.3 * r), fill=hair)
    elif cut == "long":
        if not hat:
            d.ellipse((cx - 0.75 * r, top - 0.2 * r, cx + 0.75 * r, top + 0.5 * r), fill=hair)
        d.rectangle((cx - 0.85 * r, cy - 0.5 * r, cx - 0.55 * r, cy + 0.9 * r), fill=hair)
        d.rectangle((cx + 0.55 * r, cy - 0.5 * r, cx + 0.85 * r, cy + 0.9 * r), fill=hair)
    elif cut == "spiky" and not hat:
        d.polygon(
            [(cx - 0.8 * r, top + 0.25 * r)]
            + [
                (cx + (-0.8 + 0.32 * k) * r, top - (0.35 if k % 2 else -0.05) * r)
                for k in range(1, 5)
            ]
            + [(cx + 0.8 * r, top + 0.25 * r)],
            fill=hair,
        )
    elif cut == "bun" and not hat:
        d.ellipse((cx - 0.3 * r, top - 0.45 * r, cx + 0.3 * r, top + 0.15 * r), fill=hair)
        d.rectangle((cx - 0.7 * r, top, cx + 0.7 * r, top + 0.2 * r), fill=hair)
    elif cut == "beard":
        d.chord((cx - 0.75 * r, cy - 0.1 * r, cx + 0.75 * r, cy + 0.75 * r), 0, 180, fill=hair)
    eye_y = cy - 0.15 * r
    for ex in (cx - 0.32 * r, cx + 0.32 * r):
        if look["eyes"] == "big":
            e = 0.17 * r
            d.ellipse((ex - e, eye_y - e, ex + e, eye_y + e), fill=(255, 255, 255))
            d.ellipse((ex - e / 2, eye_y - e / 2, ex + e / 2, eye_y + e / 2), fill=INK)
        elif look["eyes"] == "lines":
            d.rectangle(
                (ex - 0.16 * r, eye_y - 0.04 * r, ex + 0.16 * r, eye_y + 0.04 * r), fill=INK
            )
        else:
            e = 0.09 * r
            d.ellipse((ex - e, eye_y - e, ex + e, eye_y + e), fill=INK)
    if cut != "beard":
        d.arc(
            (cx - 0.3 * r, cy + 0.05 * r, cx + 0.3 * r, cy + 0.45 * r),
            20,
            160,
            fill=INK,
            width=max(1, int(0.07 * r)),
        )


def _draw_hat(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    top = cy - 0.85 * r
    d.polygon(
        [
            (cx - 0.55 * r, top + 0.15 * r),
            (cx + 0.55 * r, top + 0.15 * r),
            (cx + 0.1 * r, top - 1.05 * r),
        ],
        fill=HAT_COLOUR,
    )
    d.rectangle((cx - 0.95 * r, top + 0.05 * r, cx + 0.95 * r, top + 0.28 * r), fill=HAT_COLOUR)
    d.rectangle((cx - 0.5 * r, top - 0.05 * r, cx + 0.5 * r, top + 0.07 * r), fill=HAT_BAND)


def render(scene: Scene, size: int = vocab.IMAGE_SIZE) -> Image.Image:
    """Render one scene to an RGB image of `size` x `size` pixels."""
    s = SUPERSAMPLE
    big = size * s
    cx = big / 2 + scene.dx * s
    cy = big / 2 + scene.dy * s
    r = 0.40 * big * scene.scale
    if scene.subject in vocab.IDS:
        look = ID_LOOKS[scene.subject]
        cy += 0.1 * r  # leave room above the head for hair or a hat
        face = "face-square" if look["face"] == "square" else look["face"]
        mask = _shape_mask(face, big, cx, cy, 0.95 * r)
        img = _pattern(scene.style, big, mask, look["skin"])
        d = ImageDraw.Draw(img)
        _draw_face_features(d, look, cx, cy, 0.95 * r, scene.hat)
        if scene.hat:
            _draw_hat(d, cx, cy, 0.95 * r)
    else:
        assert scene.colour is not None
        mask = _shape_mask(scene.subject, big, cx, cy, r)
        img = _pattern(scene.style, big, mask, vocab.COLOURS[scene.colour])
    return img.resize((size, size), Image.Resampling.LANCZOS)
