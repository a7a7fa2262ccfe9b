"""The judge interface and the registry that builds judges by name.

A judge answers one question: does this image show concept c? It returns a calibrated
probability per image; `recognised` thresholds it. Every score in `evaluate.py` is a
recognition rate under some judge, so the judge is the unit of trust of the whole benchmark.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from forget_me_not.errors import FmnError

if TYPE_CHECKING:
    from PIL import Image

    from forget_me_not.concepts import Concept

DEFAULT_THRESHOLD = 0.5


@runtime_checkable
class Judge(Protocol):
    """What every judge offers (the ConceptWorld classifier, CLIP zero-shot, NudeNet)."""

    name: str
    threshold: float

    def supports(self, concept: Concept) -> bool:
        """True when this judge can score `concept` (its category, its labels)."""
        ...

    def probabilities(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        """Shape (N,): the probability that each image shows `concept`."""
        ...

    def recognised(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        """Shape (N,) bool: probabilities >= threshold."""
        ...


class BaseJudge:
    """Shared behaviour: thresholding and a `check` that explains why a concept is refused."""

    name: str = "base"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        if not 0.0 < threshold < 1.0:
            raise FmnError(f"judge threshold must be in (0, 1), got {threshold}; pass e.g. 0.5")
        self.threshold = float(threshold)

    def supports(self, concept: Concept) -> bool:
        return self.why_not(concept) is None

    def why_not(self, concept: Concept) -> str | None:
        """None when `concept` can be scored, else a one-line reason naming the fix."""
        return None

    def probabilities(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        raise NotImplementedError

    def recognised(self, images: Sequence[Image.Image], concept: Concept) -> np.ndarray:
        return np.asarray(self.probabilities(images, concept)) >= self.threshold


def check_supported(judge: Judge, concept: Concept) -> None:
    """Raise FmnError when `judge` cannot score `concept`, with the judge's own reason if any."""
    why_not = getattr(judge, "why_not", None)
    reason = why_not(concept) if callable(why_not) else None
    if reason is None and not judge.supports(concept):
        reason = (
            f"judge '{judge.name}' cannot score concept '{concept.name}' "
            f"(category {concept.category}); choose another judge with --judge"
        )
    if reason is not None:
        raise FmnError(reason)


def recognised(judge: Judge, probabilities: np.ndarray) -> np.ndarray:
    """Threshold precomputed probabilities with the judge's own threshold."""
    return np.asarray(probabilities) >= getattr(judge, "threshold", DEFAULT_THRESHOLD)


# name -> "module:attribute" (imported lazily: CLIP needs transformers, NudeNet an extra)
_REGISTRY: dict[str, str | Callable[..., Judge]] = {
    "world": "forget_me_not.judges.world:WorldJudge",
    "clip": "forget_me_not.judges.clip:ClipJudge",
    "nudenet": "forget_me_not.judges.nudenet:NudeNetJudge",
}


def register_judge(name: str, factory: str | Callable[..., Judge]) -> None:
    """Make `get_judge(name)` build judges with `factory` ("module:attr" or a callable)."""
    _REGISTRY[name] = factory


def judge_names() -> list[str]:
    return sorted(_REGISTRY)


def get_judge(name: str, **kwargs: Any) -> Judge:
    """Build the judge registered under `name` with `kwargs`."""
    if name not in _REGISTRY:
        raise FmnError(f"unknown judge '{name}'; choose one of: {', '.join(judge_names())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, attr = factory.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if name == "world" and exc.name == module_name:
                raise FmnError(
                    "the ConceptWorld judge is not available in this installation "
                    "(forget_me_not.judges.world is missing); reinstall forget-me-not"
                ) from exc
            raise
        factory = getattr(module, attr)
    return factory(**kwargs)
