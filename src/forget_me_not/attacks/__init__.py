"""Attacks that try to bring a forgotten concept back, by name: what the M-Score takes the
maximum over besides G.

- `inversion`: a fresh token learnt from the concept's images on the model under test (I).
- `encoder`: the base model's text encoder(s) with the patched UNet (E): on Stable Diffusion
  every user has the original text encoder, so a change on the text side alone protects nothing
  once weights ship.
- `prompts`: paraphrases the forgetting never saw (P): case, repetition, word order, and every
  context the world's captions put the concept in (ConceptWorld), or the category's extra
  templates and spellings (other models).
"""

from __future__ import annotations

from typing import Any

from forget_me_not.concepts import EXTRA_TEMPLATES, Concept
from forget_me_not.errors import FmnError

ATTACKS = ("inversion", "encoder", "prompts")


def check(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise FmnError(f"unknown attack {unknown[0]!r}: use one of {', '.join(ATTACKS)}")
    return names


def encoder_view(patch: Any) -> Any | None:
    """The patch as the base text encoder sees it: its UNet part alone (None: it has none)."""
    from forget_me_not.patch import Patch
    from forget_me_not.patch.keys import is_row_key

    if patch.kind == "embedding":
        return None
    kept = {k: v for k, v in patch.tensors.items() if not is_row_key(k)}
    return Patch(patch.kind, kept, dict(patch.metadata), patch.lora_config,
                 f"{patch.name}_unet")


def paraphrases(concept: Concept, n: int = 12, exclude: tuple[str, ...] = ()) -> list[str]:
    """Prompts for the concept that no forgetting template (nor `exclude`) spells the same
    way."""
    word = concept.words
    variants = [f"a photo of a {word.upper()}", f"a {word.capitalize()}", f"{word} {word}",
                f"{word}, a photo", f"{word} a"]
    from forget_me_not.presets import is_world_concept

    if is_world_concept(concept.name):
        from forget_me_not.world.concepts import get, held_out_prompts, prompts

        world = get(concept.name)
        variants += prompts(world, n)
        variants += [p for s, p in held_out_prompts() if s == concept.name]
    else:
        variants += [t.format(word) for t in EXTRA_TEMPLATES[concept.category]]
    seen = {*concept.prompts(), *exclude}
    return [p for p in dict.fromkeys(variants) if p not in seen]
