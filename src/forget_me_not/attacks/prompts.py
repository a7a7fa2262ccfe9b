"""Paraphrases (P): prompts for the concept that the forgetting never saw: case, repetition,
word order, and every context the world's captions put the concept in (ConceptWorld), or the
category's extra templates (other models). Shipped as data, held back from every recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forget_me_not.attacks.base import Attack, AttackSettings, Attempt
from forget_me_not.concepts import EXTRA_TEMPLATES, Concept


def paraphrases(concept: Concept, n: int = 12, exclude: tuple[str, ...] = ()) -> list[str]:
    """Prompts for the concept that no forgetting template (nor `exclude`) spells the same
    way."""
    from forget_me_not.presets import is_world_concept

    word = concept.words
    variants = [f"a photo of a {word.upper()}", f"a {word.capitalize()}", f"{word} {word}",
                f"{word}, a photo", f"{word} a"]
    if is_world_concept(concept.name):
        from forget_me_not.world.concepts import get, held_out_prompts, prompts

        world = get(concept.name)
        variants += prompts(world, n)
        variants += [p for s, p in held_out_prompts() if s == concept.name]
    else:
        variants += [t.format(word) for t in EXTRA_TEMPLATES[concept.category]]
    seen = {*concept.prompts(), *exclude}
    return [p for p in dict.fromkeys(variants) if p not in seen]


def run(pipe: Any, patches: Sequence[Any], concept: Any, judge: Any, settings: AttackSettings,
        *, base: Any = None, progress: bool = False, exclude: tuple[str, ...] = ()) -> Attempt:
    from forget_me_not.evaluate import applied
    from forget_me_not.sampling import recognition_score

    said = paraphrases(concept, exclude=exclude)
    with applied(pipe, patches):
        score = recognition_score(pipe, concept, judge, said, settings.generation(),
                                  desc=f"P {concept.name}", progress=progress)
    return Attempt("prompts", score, said)


ATTACK = Attack("prompts", "P", "paraphrases no forgetting template spells the same way", run)
