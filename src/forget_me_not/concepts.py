"""Concepts to forget, and where their tokens sit in a tokenized prompt.

A concept is named by the words that call it up in prompts ("star", "van gogh") or, after
textual inversion, by placeholder tokens ("<c0> <c1> <c2> <c3>"). Re-steering needs the
positions of those tokens in each prompt, padded to the text encoder's length, because the
cross-attention columns it suppresses are indexed by them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forget_me_not.errors import FmnError

CATEGORIES = ("id", "object", "style", "nsfw")

# The paper's templates: "a photo of {}" for IDs and objects, "a photo in the style of {}" for
# styles. The official code names an NSFW template that does not exist; nudity is an object-like
# concept, so it takes the object template.
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "id": ("a photo of {}",),
    "object": ("a photo of {}",),
    "style": ("a photo in the style of {}",),
    "nsfw": ("a photo of {}",),
}

# Optional paraphrases, for runs that want more than the paper's single template.
EXTRA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "id": ("a portrait of {}", "a picture of {}", "{}"),
    "object": ("a picture of {}", "an image of {}", "{}"),
    "style": ("a painting in the style of {}", "a drawing in the style of {}", "{} style"),
    "nsfw": ("a picture of {}", "an image of {}", "{}"),
}


def check_anchor(anchor: str | None) -> None:
    """One-line error for anchor words that are given but empty."""
    if anchor is not None and not anchor.strip():
        raise FmnError("concept anchor is empty: pass the words it should become, or None")


@dataclass(frozen=True)
class Concept:
    """One concept to forget."""

    name: str  # the words as they appear in prompts, e.g. "star", "van gogh"
    category: str = "object"  # one of CATEGORIES
    templates: tuple[str, ...] = ()  # each holds "{}"; empty -> the category's default
    images: tuple[Path, ...] = ()  # reference images of the concept
    token_words: str | None = None  # placeholder tokens after inversion; used instead of name
    # What the concept should become: its prompts are also pulled toward the same prompts with
    # these words in its place (the anchor concept of Kumari et al., "Ablating Concepts", 2023).
    anchor: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise FmnError("concept name is empty: pass the words that call it up, e.g. 'star'")
        if self.category not in CATEGORIES:
            raise FmnError(
                f"unknown concept category {self.category!r}: use one of {', '.join(CATEGORIES)}"
            )
        templates = tuple(self.templates) or DEFAULT_TEMPLATES[self.category]
        for t in templates:
            if t.count("{}") != 1:
                raise FmnError(f"prompt template {t!r} must contain '{{}}' exactly once")
        object.__setattr__(self, "templates", templates)
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        if self.token_words is not None and not self.token_words.strip():
            raise FmnError("concept token_words is empty: pass the placeholder tokens or None")
        check_anchor(self.anchor)

    @property
    def words(self) -> str:
        """The words re-steering looks for in the prompts."""
        return self.token_words if self.token_words is not None else self.name

    def prompts(self) -> list[str]:
        """The templates filled with the concept's words."""
        return [t.format(self.words) for t in self.templates]

    def anchor_prompts(self) -> list[str]:
        """The templates filled with the anchor words (one per prompt, same order); [] without."""
        return [t.format(self.anchor) for t in self.templates] if self.anchor else []

    def neutral_prompts(self) -> list[str]:
        """The templates with the anchor words in the concept's place, or with nothing (one per
        prompt, same order): what its prompts say besides the concept."""
        return [_normalise(t.format(self.anchor or "")) for t in self.templates]

    def with_extra_templates(self) -> Concept:
        """The same concept with the category's extra paraphrase templates added."""
        extra = tuple(t for t in EXTRA_TEMPLATES[self.category] if t not in self.templates)
        return dataclasses.replace(self, templates=self.templates + extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "templates": list(self.templates),
            "images": [str(p) for p in self.images],
            "token_words": self.token_words,
            "anchor": self.anchor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Concept:
        """The concept a patch's metadata records (its reference images are not kept)."""
        return cls(data["name"], data.get("category", "object"), tuple(data.get("templates", ())),
                   token_words=data.get("token_words"), anchor=data.get("anchor"))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _word_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_known(tokenizer: Any, words: str) -> None:
    """Refuse words the tokenizer does not know: the model cannot have learnt them as a concept."""
    unk = getattr(tokenizer, "unk_token_id", None)
    added = set(getattr(tokenizer, "get_added_vocab", dict)())
    for word in words.split():
        if word in added:
            continue
        ids = _word_ids(tokenizer, word)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        if not ids or (unk is not None and unk in ids):
            raise FmnError(
                f"the tokenizer does not know {word!r}: learn tokens for the concept from "
                "images with `fmn invert`, then forget those"
            )
        # A word of 3+ letters spelt out letter by letter has no token of its own, so the
        # model cannot have learnt it as one concept.
        bare = [p.replace("</w>", "") for p in pieces]
        if len(word) >= 3 and len(bare) == len(word) and all(len(p) == 1 for p in bare):
            raise FmnError(
                f"the tokenizer spells {word!r} letter by letter (the model has no word for "
                "it): learn tokens for the concept from images with `fmn invert`, then forget "
                "those"
            )


def locate_tokens(
    tokenizer: Any,
    prompt: str,
    words: str,
    extra: str = "none",
) -> list[int]:
    """Positions of `words`' tokens in `prompt` tokenized and padded to model_max_length.

    Every occurrence counts; matching is case-insensitive (the prompt's own spelling is
    tokenized, so tokenizers that keep case work too). `extra` adds: "eot", the first
    end-of-text position (the pooled token); "pooler", every position whose id is the
    end-of-text id, as the official code's `use_pooler` does (SD 1.x pads with that id, so the
    padding too; SD 2.x pads with "!", so the one token); "padding", the first end-of-text and
    every position after it (a causal text encoder writes the whole prompt into each of them).
    Raises FmnError when the words do not occur.
    """
    words = _normalise(words)
    prompt_n = _normalise(prompt)
    max_len = tokenizer.model_max_length
    ids = list(
        tokenizer(prompt_n, padding="max_length", max_length=max_len, truncation=True)["input_ids"]
    )
    spans = [
        m.group(0)
        for m in re.finditer(re.escape(words).replace(r"\ ", r"\s+"), prompt_n, flags=re.IGNORECASE)
    ]
    if not spans:
        raise FmnError(
            f"concept words {words!r} do not occur in the prompt {prompt!r}: use a template "
            "with '{}', or learn tokens for the concept with `fmn invert`"
        )
    check_known(tokenizer, words)
    positions: set[int] = set()
    for span in dict.fromkeys(spans):  # each spelling once
        sub = _word_ids(tokenizer, span)
        n = len(sub)
        for i in range(len(ids) - n + 1):
            if ids[i : i + n] == sub:
                positions.update(range(i, i + n))
    if not positions:
        raise FmnError(
            f"the tokens of {words!r} are not in the tokenized prompt {prompt!r} (cut off at "
            f"{max_len} tokens?): shorten the prompt, or learn tokens with `fmn invert`"
        )
    eos = tokenizer.eos_token_id
    if extra == "pooler":
        positions.update(i for i, t in enumerate(ids) if t == eos)
    elif extra in ("eot", "padding"):
        # The first end-of-text token is the pooled one (padding may reuse the same id).
        first = next((i for i, t in enumerate(ids) if t == eos and i > 0), None)
        if first is not None:
            positions.update(range(first, len(ids)) if extra == "padding" else (first,))
    elif extra != "none":
        raise FmnError(f"unknown extra positions {extra!r}: use none, eot, pooler or padding")
    return sorted(positions)


def pipeline_tokenizers(pipe: Any) -> list[Any]:
    """The pipeline's tokenizers, in text-encoder order (one for SD 1/2, two for SDXL)."""
    toks = [getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)]
    return [t for t in toks if t is not None]


def locate_in_pipeline(
    pipe: Any,
    prompt: str,
    words: str,
    extra: str = "none",
) -> list[list[int]]:
    """`locate_tokens` for each of the pipeline's tokenizers (one list per tokenizer)."""
    return [
        locate_tokens(t, prompt, words, extra)
        for t in pipeline_tokenizers(pipe)
    ]


def merge_positions(per_tokenizer: Sequence[Sequence[int]]) -> list[int]:
    """One position list for the cross-attention columns.

    SDXL concatenates both encoders' states position by position, so a column mixes the two
    tokenizers' tokens at that index; the union keeps every column either places the concept in.
    """
    return sorted({p for positions in per_tokenizer for p in positions})


@dataclass
class TokenMask:
    """Kept token positions per batch row, as a padded index for gathering columns."""

    index: torch.Tensor  # (batch, k_max) long: positions, padded with 0
    valid: torch.Tensor  # (batch, k_max) bool: False where padded
    seq_len: int = field(default=77)

    @classmethod
    def from_positions(cls, rows: Sequence[Sequence[int]], seq_len: int) -> TokenMask:
        if not rows or any(len(r) == 0 for r in rows):
            raise FmnError("every batch row needs at least one concept token position")
        k_max = max(len(r) for r in rows)
        index = torch.zeros(len(rows), k_max, dtype=torch.long)
        valid = torch.zeros(len(rows), k_max, dtype=torch.bool)
        for b, r in enumerate(rows):
            if max(r) >= seq_len or min(r) < 0:
                raise FmnError(f"token position out of range 0..{seq_len - 1}: {list(r)}")
            index[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            valid[b, : len(r)] = True
        return cls(index, valid, seq_len)

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    def dense(self) -> torch.Tensor:
        """(batch, seq_len) bool mask of kept positions."""
        out = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool)
        for b in range(self.batch_size):
            out[b, self.index[b][self.valid[b]]] = True
        return out
