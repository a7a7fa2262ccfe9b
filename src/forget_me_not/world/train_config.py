"""Settings of a ConceptWorld model's training run, and the schedules they give."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from forget_me_not.errors import FmnError
from forget_me_not.world import model as world_model
from forget_me_not.world import vocab


@dataclass
class TrainModelConfig:
    run_dir: Path = Path("runs/world-model")  # checkpoints and logs
    export_dir: Path | None = None  # where the finished pipeline goes (None: run_dir/pipeline)
    seed: int = 0
    pool_size: int = 20_000  # rendered training pairs
    batch_size: int = 32
    vae_steps: int = 500
    vae_lr: float = 1e-3
    unet_steps: int = 8000
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    cooldown_steps: int = 1500  # linear decay of the lr to zero over the last N UNet steps
    ema_decay: float = 0.999
    cond_drop: float = 0.1  # share of empty captions, for classifier-free guidance
    checkpoint_every: int = 250
    # word -> sampling weight for the captions holding it (e.g. {"dotted": 3.0}), to train on
    # the concepts the model draws least reliably; empty: uniform over the pool
    caption_boost: dict[str, float] = field(default_factory=dict)
    # world concepts no training pair names or shows: the retrained reference of unlearning
    # (a model that never learnt them), against which an attack's figures are read
    leave_out: tuple[str, ...] = ()
    max_minutes: float | None = None  # stop the UNet stage early at this wall time, then export
    device: str = "cpu"
    model: world_model.WorldModelConfig = field(default_factory=world_model.WorldModelConfig)

    def __post_init__(self) -> None:
        for name in ("pool_size", "batch_size", "vae_steps", "unet_steps", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.unet_lr <= 0:
            raise ValueError(f"unet_lr must be positive, got {self.unet_lr}")
        for word, weight in self.caption_boost.items():
            if not weight > 0:
                raise ValueError(f"caption boost of {word!r} must be positive, got {weight}")
        self.leave_out = tuple(sorted({w.strip().lower() for w in self.leave_out}))
        unknown = [w for w in self.leave_out if w not in vocab.all_words() or w in
                   vocab.GLUE_WORDS]
        if unknown:
            allowed = [w for w in vocab.SUBJECTS + vocab.STYLES + tuple(vocab.COLOURS)
                       if w != vocab.ROLE_ID]
            raise FmnError(f"--leave-out {unknown[0]!r} is not a world concept: pick from "
                           f"{', '.join(allowed)}")
        if vocab.ROLE_ID in self.leave_out or vocab.ROLE in self.leave_out:
            raise FmnError(f"--leave-out {vocab.ROLE_ID!r} or {vocab.ROLE!r}: the role is drawn "
                           "as that ID, so neither can be left out alone; leave out another "
                           "concept")


def parse_boost(items: list[str]) -> dict[str, float]:
    """`["dotted=3", "style=2"]` -> {"dotted": 3.0, "style": 2.0}, or a one-line error."""
    boost: dict[str, float] = {}
    for item in items:
        word, _, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not word.strip() or not value > 0:
            raise FmnError(f"--boost {item!r} must be WORD=W with W > 0, e.g. --boost dotted=3")
        boost[word.strip().lower()] = value
    return boost


def caption_weights(captions: list[str], boost: dict[str, float]) -> torch.Tensor:
    """Sampling weight of each caption: the product of the boosts of the words it holds."""
    weights = torch.ones(len(captions), dtype=torch.float64)
    for i, caption in enumerate(captions):
        for word in set(caption.lower().split()):
            weights[i] *= boost.get(word, 1.0)
    return weights


def unet_lr_at(cfg: TrainModelConfig, step: int) -> float:
    """Linear warm-up, constant, then (optionally) linear cool-down to zero at the last step."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    left = cfg.unet_steps - step
    cool = min(1.0, left / cfg.cooldown_steps) if cfg.cooldown_steps > 0 else 1.0
    return cfg.unet_lr * min(warm, cool)
