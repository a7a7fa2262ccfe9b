"""Settings of a correction. Defaults measured on ConceptWorld's wizard -> milka (BENCHMARKS.md,
"Correction"); `recipes/correction.yaml` carries them with their reasons."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.settings import check_choice, check_number, setting

VARIANTS = ("embedding", "resteer")


@dataclass
class CorrectionConfig:
    variant: str = setting("embedding", "'embedding': train only the role's token rows toward "
                           "the anchors; 'resteer': re-steer the UNet with the family's FMN "
                           "recipe (a LoRA patch).", VARIANTS)
    toward: tuple[str, ...] = setting((), "Prompts that show the role on someone else, which "
                                      "the role is pulled toward (automatic on ConceptWorld).")
    anchor_weight: float = setting(50.0, "resteer: weight of the pull toward `toward` (0: off).")
    preserve_weight: float = setting(5.0, "resteer: weight keeping the identity's own prompts "
                                     "(0: the FMN recipe's retention as it is).")
    preserve_prompts: tuple[str, ...] = setting((), "resteer: prompts kept (default: the "
                                                "identity's own prompts).")
    hold_transparent: float = setting(0.0, "resteer with anchors: weight holding transparent "
                                      "reference pixels (the anchors keep the costume).")
    step_factor: int = setting(2, "resteer: the FMN recipe's steps times this (moving toward "
                               "the anchors takes longer than forgetting).")
    pull_steps: int = setting(150, "embedding: optimiser steps.")
    pull_lr: float = setting(5e-3, "embedding: Adam learning rate.")
    anchor_steps: int = setting(25, "embedding: denoising steps of the anchor images.")
    anchor_images: int = setting(1, "embedding: images drawn per anchor prompt.")
    n_check: int = setting(8, "Role samples judged before training (0: skip the check).")
    warn_below: float = setting(0.3, "Warn when fewer role samples than this show the identity.")
    seed: int = setting(0, "Seed of every random draw.")

    def __post_init__(self) -> None:
        check_choice("correction variant", self.variant, VARIANTS)
        self.toward = tuple(self.toward)
        self.preserve_prompts = tuple(self.preserve_prompts)
        for name in ("anchor_weight", "preserve_weight", "hold_transparent"):
            check_number(name, getattr(self, name))
        check_number("pull_lr", self.pull_lr, strict=True)
        check_number("warn_below", self.warn_below, high=1.0)
        for name in ("step_factor", "pull_steps", "anchor_steps", "anchor_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FmnError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if not isinstance(self.n_check, int) or self.n_check < 0:
            raise FmnError(f"n_check must be an integer >= 0, got {self.n_check}")
        if any(not p.strip() for p in (*self.toward, *self.preserve_prompts)):
            raise FmnError("a --toward or preserve prompt is empty: pass prompts like "
                           "'a woman warrior in armour'")
