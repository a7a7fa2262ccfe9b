"""Image sheets and safe saving: labelled grids, and PNGs that never appear half-written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from forget_me_not.errors import FmnError
from forget_me_not.files import probe_writable, write_atomic

MIN_CELL = 128  # tiny models draw 16-32 px images; upscale them so captions stay legible
CAPTION_H = 14
PAD = 4


def check_output_path(path: str | Path, suffix: str = ".png") -> Path:
    """The output file's folder must exist and be writable; checked before any work starts."""
    path = Path(path).expanduser()
    if suffix and path.suffix.lower() != suffix:
        raise FmnError(f"output {path} must end in {suffix}; pick a name like grid{suffix}")
    parent = path.parent
    blocking = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise FmnError(f"output {path} is under {blocking}, which is a file; pick another --out")
    if not parent.is_dir():
        raise FmnError(f"output folder {parent} does not exist; create it or pick another --out")
    if path.is_dir():
        raise FmnError(f"output {path} is a folder; give a file name such as {path / 'grid.png'}")
    probe_writable(parent)
    return path


def save_png(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Save as PNG through a temp file in the same folder, then rename (atomic on POSIX)."""
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), "image")


def save_numbered(images: Sequence[Image.Image], folder: str | Path, stem: str) -> tuple[Path, ...]:
    """Write `images` as `folder/stem_00.png`, `stem_01.png`, ...; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return tuple(paths)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """Cut `text` with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    title: str | None = None,
    cols: int | None = None,
) -> Image.Image:
    """A grid of `images`, each with its caption underneath, and an optional title line on top."""
    if not images:
        raise ValueError("labelled_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w0, h0 = images[0].size
    scale = max(1, math.ceil(MIN_CELL / max(w0, h0)))
    cw, ch = w0 * scale, h0 * scale
    cap_h = CAPTION_H if captions else 0
    title_h = CAPTION_H + PAD if title else 0
    sheet = Image.new(
        "RGB",
        (PAD + cols * (cw + PAD), title_h + PAD + rows * (ch + cap_h + PAD)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    font = _font()
    if title:
        draw.text(
            (PAD, PAD), _fit(draw, title, sheet.width - 2 * PAD, font), fill="black", font=font
        )
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = PAD + c * (cw + PAD), title_h + PAD + r * (ch + cap_h + PAD)
        cell = img.convert("RGB")
        if cell.size != (cw, ch):
            cell = cell.resize((cw, ch), Image.NEAREST)  # keep pixels crisp for inspection
        sheet.paste(cell, (x, y))
        if captions:
            draw.text((x, y + ch + 1), _fit(draw, captions[i], cw, font), fill="black", font=font)
    return sheet
