"""Reference images: a folder (or list of files) -> checked PIL images -> cropped tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from forget_me_not.errors import FmnError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    names = ", ".join(p.name for p in paths[:limit])
    return names + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def image_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files to read: every file of a folder (hidden ones skipped), or the given files."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if not source.exists():
            raise FmnError(f"image folder {source} does not exist: pass a folder of images")
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.is_file()
                           and not p.name.startswith("."))
            if not files:
                raise FmnError(f"image folder {source} is empty: put reference images in it")
            return files
        return [source]
    files = [Path(p) for p in source]
    if not files:
        raise FmnError("no reference images given: pass a folder of images")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FmnError(f"image files not found: {_listing(missing)}: check the paths")
    return files


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha channel or a transparent colour)."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _convert(image: Image.Image, keep_alpha: bool) -> Image.Image:
    return image.convert("RGBA" if keep_alpha and has_alpha(image) else "RGB")


def load_images(
    source: str | Path | Iterable[str | Path] | Iterable[Image.Image],
    min_size: int | None = None,
    keep_alpha: bool = False,
) -> list[Image.Image]:
    """Read and check reference images (RGB): a folder, files, or PIL images.

    With `keep_alpha`, images that carry transparency come back as RGBA (re-steering reads
    the alpha as where its loss applies). Refuses, listing the offenders: files that are not
    readable images, and (with `min_size`) images whose shorter side is below the model's
    resolution, since upscaling them would teach the model blur rather than the concept.
    """
    if not isinstance(source, (str, Path)):
        source = list(source)
        if source and all(isinstance(s, Image.Image) for s in source):
            # Images already in memory (e.g. generated anchors): only the size check applies.
            return _check_sizes([_convert(im, keep_alpha) for im in source],
                                [f"image {i}" for i in range(len(source))], min_size)
    files = image_files(source)
    bad: list[Path] = []
    images: list[Image.Image] = []
    names: list[str] = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                image = _convert(im, keep_alpha)
        except (UnidentifiedImageError, OSError, ValueError):
            bad.append(path)
            continue
        images.append(image)
        names.append(path.name)
    if bad:
        raise FmnError(
            f"{len(bad)} file(s) are not readable images: {_listing(bad)}: remove or replace them"
        )
    return _check_sizes(images, names, min_size)


def _check_sizes(images: list[Image.Image], names: list[str],
                 min_size: int | None) -> list[Image.Image]:
    small = [f"{name} ({im.size[0]}x{im.size[1]})" for im, name in zip(images, names, strict=True)
             if min_size is not None and min(im.size) < min_size]
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise FmnError(
            f"{len(small)} image(s) are smaller than the model's {min_size} px: {shown}: "
            f"use images of at least {min_size}x{min_size}"
        )
    return images


def resize_random_crop(
    image: Image.Image, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear), crop a random square: (C, size, size)
    in [-1, 1].

    C is 3 for RGB images and 4 for RGBA (the alpha channel is cropped along, also in [-1, 1]).
    """
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)  # as the official recipe
    top = int(torch.randint(0, nh - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, nw - size + 1, (1,), generator=generator))
    crop = image.crop((left, top, left + size, top + size))
    array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0  # (size, size, C)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (C, size, size)


def model_resolution(pipe: object) -> int:
    """The pixel size the pipeline was trained at: UNet sample size times the VAE factor."""
    unet = pipe.unet  # type: ignore[attr-defined]
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))
