"""What every attack shares: its settings (fixed budget and seed) and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from forget_me_not.errors import FmnError
from forget_me_not.sampling import GenerationSettings
from forget_me_not.scores import RecognitionScore


@dataclass(frozen=True)
class AttackSettings:
    """One attack run: how much it may search, and how its samples are drawn and judged."""

    n: int = 32  # samples judged
    seed: int = 1000  # sample i: seed + i; the search's own randomness starts here too
    steps: int = 25  # denoising steps per sample
    guidance: float | None = None  # None: the pipeline's default
    batch_size: int = 8
    budget: int = 150  # optimisation steps of the searching attacks (inversion, adversarial)
    num_tokens: int = 1  # tokens learnt by inversion
    lr: float | None = None  # inversion's learning rate (None: its default)
    init_words: str | None = None  # inversion: start from these words (e.g. the concept's)
    max_anchors: int = 8  # reference images the searching attacks learn from
    adversarial_tokens: int = 4  # K tokens the adversarial search puts before the prompt
    adversarial_lr: float = 0.05

    def __post_init__(self) -> None:
        for name in ("n", "budget", "num_tokens", "max_anchors", "adversarial_tokens", "steps"):
            if getattr(self, name) < 1:
                raise FmnError(f"attack {name.replace('_', ' ')} must be at least 1, got "
                               f"{getattr(self, name)}")
        if not self.adversarial_lr > 0:
            raise FmnError(f"adversarial lr must be positive, got {self.adversarial_lr}")

    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.n, self.seed, self.steps, self.guidance, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Attempt:
    """An attack's samples for one concept, judged: `score.rate` is its part of the M-Score."""

    attack: str
    score: RecognitionScore
    prompts: list[str]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.score.rate

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "rate": self.rate, "prompts": self.prompts[:8],
                "detail": self.detail}


AttackFn = Callable[..., Attempt]


@dataclass(frozen=True)
class Attack:
    name: str
    letter: str  # its column in tables: I, E, P, A
    summary: str
    run: AttackFn


def anchors_for(concept: Any, max_anchors: int, base: RecognitionScore | None) -> list[Any]:
    """The concept's reference images, else the base model's own recognised samples."""
    from forget_me_not.evaluate import choose_anchors, load_anchor_images

    if concept.images:
        return load_anchor_images(list(concept.images)[:max_anchors])
    if base is None or not base.images or not bool(base.recognised.any()):
        raise FmnError(f"no anchor images for '{concept.name}': the base model does not draw it "
                       "recognisably; give reference images with --images DIR")
    return choose_anchors(base, max_anchors)

