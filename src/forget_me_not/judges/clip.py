"""CLIP zero-shot judge: P(concept | image) = softmax over the category's label set.

The label set comes from the suite (every concept of that category plus distractor labels), so
a style is judged against other styles and an object against other objects. The image
preprocessing is done here with PIL + numpy (resize shortest side, centre crop, normalise), so
no torchvision is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from forget_me_not.errors import FmnError
from forget_me_not.judges.base import DEFAULT_THRESHOLD, BaseJudge

if TYPE_CHECKING:
    from forget_me_not.concepts import Concept

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# Text prompts per category; the label is written where "{}" stands.
DEFAULT_TEXT_TEMPLATES = {
    "id": "a photo of {}",
    "object": "a photo of {}",
    "style": "a painting in the style of {}",
    "nsfw": "a photo of {}",
}
# OpenAI CLIP's normalisation, used when the model folder has no preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipJudge(BaseJudge):
    """Zero-shot CLIP classifier over per-category label sets.

    model: a local folder or hub id of a transformers CLIPModel (with its tokenizer files), or
        an already built CLIPModel (then pass `tokenizer` too).
    labels: category -> labels, e.g. {"style": ["van gogh", "monet", ...]}. A concept whose
        name is missing from its category's labels is added to that set when judged.
    """

    name = "clip"

    def __init__(
        self,
        model: str | Path | Any = DEFAULT_CLIP_MODEL,
        labels: Mapping[str, Sequence[str]] | None = None,
        *,
        tokenizer: Any = None,
        text_templates: Mapping[str, str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(threshold)
        if batch_size <= 0:
            raise FmnError(f"CLIP judge batch_size must be positive, got {batch_size}")
        self.labels = {cat: list(dict.fromkeys(ls)) for cat, ls in (labels or {}).items()}
        self.text_templates = {**DEFAULT_TEXT_TEMPLATES, **(text_templates or {})}
        for cat, template in self.text_templates.items():
            if "{}" not in template:
                raise FmnError(f"CLIP text template for '{cat}' must contain '{{}}': {template!r}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = batch_size
        self._source = str(model) if isinstance(model, (str, Path)) else None
        if self._source is not None:
            model, tokenizer = _load_clip(self._source)
        elif tokenizer is None:
            raise FmnError("ClipJudge given a model object needs its tokenizer too (tokenizer=...)")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self._mean, self._std, self._size, self._crop = _preprocess_settings(
            self._source, self.model
        )
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    # -- support ---------------------------------------------------------------------------
    def label_set(self, concept: Concept) -> list[str]:
        labels = list(self.labels.get(concept.category, []))
        lowered = [label.lower() for label in labels]
        if concept.name.lower() not in lowered:
            labels.append(concept.name)
        return labels

    def why_not(self, concept: Concept) -> str | None:
        return label_problem(self.labels, concept, self.text_templates)

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        reason = self.why_not(concept)
        if reason is not None:
            raise FmnError(reason)
        labels = self.label_set(concept)
        index = [label.lower() for label in labels].index(concept.name.lower())
        text = self._text_embeddings(concept.category, labels)  # (L, D), unit norm
        scale = self.model.logit_scale.exp()
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self._pixels(images[start : start + self.batch_size])  # (B, 3, S, S)
            feats = _pooled(self.model.get_image_features(pixel_values=pixels))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            probs = (scale * feats @ text.T).softmax(dim=-1)  # (B, L)
            out.append(probs[:, index].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _text_embeddings(self, category: str, labels: list[str]) -> torch.Tensor:
        key = (category, *labels)
        if key not in self._text_cache:
            template = self.text_templates[category]
            max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
            tokens = self.tokenizer(
                [template.format(label) for label in labels],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(self.device)
            feats = _pooled(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
                )
            )
            self._text_cache[key] = feats / feats.norm(dim=-1, keepdim=True)
        return self._text_cache[key]

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [_preprocess(img, self._size, self._crop) for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        mean = torch.tensor(self._mean).view(1, 3, 1, 1)
        std = torch.tensor(self._std).view(1, 3, 1, 1)
        dtype = next(self.model.parameters()).dtype
        return ((batch - mean) / std).to(self.device, dtype)


def label_problem(labels: Mapping[str, Sequence[str]], concept: Concept,
                  text_templates: Mapping[str, str] = DEFAULT_TEXT_TEMPLATES) -> str | None:
    """Why CLIP cannot judge `concept` with these label sets (None when it can)."""
    others = [x for x in labels.get(concept.category, []) if x.lower() != concept.name.lower()]
    if not others:
        return (
            f"CLIP judge has no labels for category '{concept.category}' to compare "
            f"'{concept.name}' against; add a '{concept.category}' label list to the suite "
            "(labels: section) or choose another judge with --judge"
        )
    if concept.category not in text_templates:
        return f"CLIP judge has no text template for category '{concept.category}'"
    return None


def _pooled(out: Any) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, >= 5 a model output with pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_clip(source: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CLIPModel

    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise FmnError(f"CLIP model '{source}' is a file; pass a folder with a CLIPModel")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FmnError(f"CLIP model folder '{source}' does not exist; pass --judge-model DIR")
    try:
        model = CLIPModel.from_pretrained(str(local) if local.is_dir() else source)
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else source)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = ("no such local folder, and the hub is unreachable (offline)"
                 if offline and not local.is_dir()
                 else f"loading failed: {' '.join(str(exc).split())[:200]}")
        raise FmnError(
            f"cannot load CLIP model '{source}': {where}; pass --judge-model with a local "
            "folder holding a transformers CLIPModel and its tokenizer"
        ) from exc
    return model, tokenizer


def _preprocess_settings(
    source: str | None, model: Any
) -> tuple[tuple[float, ...], tuple[float, ...], int, int]:
    size = crop = int(model.config.vision_config.image_size)
    mean, std = _CLIP_MEAN, _CLIP_STD
    cfg_path = Path(source) / "preprocessor_config.json" if source else None
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        raw_size = cfg.get("size", size)
        size = int(raw_size.get("shortest_edge", size) if isinstance(raw_size, dict) else raw_size)
        raw_crop = cfg.get("crop_size", crop)
        crop = int(raw_crop.get("height", crop) if isinstance(raw_crop, dict) else raw_crop)
    return mean, std, size, crop


def _preprocess(image: Image.Image, size: int, crop: int) -> np.ndarray:
    """Resize the shortest side to `size` (bicubic), centre-crop `crop`, scale to [0, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(crop, round(w * scale)), max(crop, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.float32) / 255.0  # (crop, crop, 3)
