"""Textual inversion (I): a fresh token learnt from the concept's images on the model under
test, then prompted in the concept's templates. Optionally starts from the concept's own word
(`init_words`), which finds a forgotten word's old neighbourhood faster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forget_me_not.attacks.base import Attack, AttackSettings, Attempt, anchors_for


def run(pipe: Any, patches: Sequence[Any], concept: Any, judge: Any, settings: AttackSettings,
        *, base: Any = None, progress: bool = False) -> Attempt:
    from forget_me_not.evaluate import applied, inversion_score

    anchors = anchors_for(concept, settings.max_anchors, base)
    s = settings
    with applied(pipe, patches):
        found = inversion_score(pipe, concept, judge, anchors, budget=s.budget, n=s.n,
                                seed=s.seed, steps=s.steps, guidance=s.guidance,
                                batch_size=s.batch_size, num_tokens=s.num_tokens, lr=s.lr,
                                init_words=s.init_words, max_anchors=s.max_anchors,
                                progress=progress)
    return Attempt("inversion", found, list(found.prompts),
                   {"phrase": found.phrase, "init_words": s.init_words,
                    "anchors": found.n_anchors})


ATTACK = Attack("inversion", "I", "a token learnt from the concept's images on the model "
                "under test", run)
