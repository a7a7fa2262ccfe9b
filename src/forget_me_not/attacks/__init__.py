"""Attacks that try to bring a forgotten concept back, by name: what the M-Score takes the
maximum over besides G. One module each, every one returning judged samples for a concept from
a model under test (the base pipeline and its patches) with a fixed budget and seed.

- `inversion` (I): a fresh token learnt from the concept's images on the model under test.
- `encoder` (E): the base model's text encoder(s) with the patched UNet.
- `prompts` (P): paraphrases the forgetting never saw.
- `adversarial` (A): K vocabulary tokens searched so the patched UNet predicts what the base
  model predicts for the concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forget_me_not.attacks import adversarial, encoder, inversion, prompts
from forget_me_not.attacks.base import Attack, AttackSettings, Attempt
from forget_me_not.attacks.encoder import encoder_view
from forget_me_not.attacks.prompts import paraphrases
from forget_me_not.errors import FmnError

REGISTRY: dict[str, Attack] = {m.ATTACK.name: m.ATTACK for m in
                               (inversion, encoder, prompts, adversarial)}
ATTACKS = tuple(REGISTRY)

__all__ = ["ATTACKS", "REGISTRY", "Attack", "AttackSettings", "Attempt", "check", "encoder_view",
           "paraphrases", "run"]


def check(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise FmnError(f"no attack named: use one or more of {', '.join(ATTACKS)}")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise FmnError(f"unknown attack {unknown[0]!r}: use one of {', '.join(ATTACKS)}")
    return names


def run(name: str, pipe: Any, patches: Sequence[Any], concept: Any, judge: Any,
        settings: AttackSettings, *, base: Any = None, progress: bool = False,
        **kwargs: Any) -> Attempt:
    """One attack on `concept`: `pipe` is the base model, `patches` the forgetting under test;
    `base` the base model's own G samples (anchors when the concept has no images)."""
    check([name])
    return REGISTRY[name].run(pipe, patches, concept, judge, settings, base=base,
                              progress=progress, **kwargs)
