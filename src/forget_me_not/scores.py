"""Results of a measurement: recognition, inversion and M-Scores, per concept and per suite."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from forget_me_not.concepts import Concept



# -- results ------------------------------------------------------------------------------------
@dataclass
class RecognitionScore:
    """One recognition rate: N generated images, their judge probabilities, the rate."""

    rate: float
    probabilities: np.ndarray  # (N,)
    recognised: np.ndarray  # (N,) bool
    prompts: list[str]
    seeds: list[int]
    images: list[Image.Image] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "n": len(self.seeds),
            "probabilities": [round(float(p), 6) for p in self.probabilities],
            "recognised": [bool(r) for r in self.recognised],
            "prompts": self.prompts,
            "seeds": self.seeds,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class InversionScore(RecognitionScore):
    """I(c): the recognition rate of images generated from a freshly inverted token."""

    phrase: str = ""  # the placeholder phrase the inversion learned, e.g. "<c0>"
    budget: int = 0  # inversion steps
    n_anchors: int = 0
    inversion_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "phrase": self.phrase,
            "budget": self.budget,
            "n_anchors": self.n_anchors,
            "inversion_seconds": round(self.inversion_seconds, 3),
        }


@dataclass
class MScore:
    """M(c) = max(G, I) with both parts; I is None when inversion was not run."""

    g: RecognitionScore
    i: InversionScore | None = None

    @property
    def m(self) -> float:
        return max(self.g.rate, self.i.rate) if self.i is not None else self.g.rate

    @property
    def m_from(self) -> str:
        return "i" if self.i is not None and self.i.rate > self.g.rate else "g"

    def to_dict(self) -> dict[str, Any]:
        return {
            "g": self.g.rate,
            "i": None if self.i is None else self.i.rate,
            "m": self.m,
            "m_from": self.m_from,
            "generation": self.g.to_dict(),
            "inversion": None if self.i is None else self.i.to_dict(),
        }


@dataclass
class ConceptResult:
    key: str
    concept: Concept
    judge: str
    target: bool
    group: str
    before: MScore
    after: MScore | None = None

    @property
    def retention(self) -> float | None:
        """G_after / G_before for non-targets; None for targets, without a patch, or G_before 0."""
        if self.target or self.after is None or self.before.g.rate == 0:
            return None
        return self.after.g.rate / self.before.g.rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.concept.name,
            "category": self.concept.category,
            "group": self.group,
            "target": self.target,
            "judge": self.judge,
            "before": self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "retention": self.retention,
        }


@dataclass
class SuiteResult:
    concepts: list[ConceptResult]
    targets: list[str]
    settings: dict[str, Any]
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        targets = [c for c in self.concepts if c.target]
        kept = [c.retention for c in self.concepts if c.retention is not None]
        after = [c for c in targets if c.after is not None]
        return {
            "n_concepts": len(self.concepts),
            "targets": self.targets,
            "target_m_before": mean_or_none([c.before.m for c in targets]),
            "target_m_after": mean_or_none([c.after.m for c in after]),
            "mean_m_before": mean_or_none([c.before.m for c in self.concepts]),
            "mean_retention": mean_or_none(kept),
            "min_retention": min(kept) if kept else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "concepts": [c.to_dict() for c in self.concepts],
        }


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None
