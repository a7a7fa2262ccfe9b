"""Settings of ESD, named as the official `esd_sd.py` names them."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn.config import LORA_TARGETS, PRECISIONS
from forget_me_not.settings import check_choice, check_number, setting

TRAIN_MODES = ("xattn", "noxattn", "lora")


@dataclass
class EsdConfig:
    train: str = setting("xattn", "'xattn': ESD-x, the cross-attention weights; 'noxattn': "
                         "ESD-u, every weight outside cross-attention; 'lora': ESD-x as a LoRA "
                         "on the attn2 projections (a patch of a few MB).", TRAIN_MODES)
    iterations: int = setting(200, "Optimiser steps (--iterations).")
    lr: float = setting(5e-5, "Adam learning rate (--lr).")
    negative_guidance: float = setting(2.0, "eta in target = e_c - eta (e_c - e_0), with e_c, "
                                       "e_0 the frozen model's concept and empty predictions; "
                                       "2 here is the paper's e_0 - 1 (e_c - e_0).")
    guidance_scale: float = setting(3.0, "Guidance of the partial denoising that draws x_t.")
    sample_steps: int = setting(50, "Denoising steps of that sampling; x_t stops at a uniform "
                                "one of them.")
    lora_rank: int = setting(4, "train=lora: LoRA rank.")
    lora_alpha: float | None = setting(None, "train=lora: alpha (null: the rank).")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, "train=lora: attn2 projections.")
    mixed_precision: str = setting("no", "Autocast of the forward passes.", PRECISIONS)
    seed: int = setting(0, "Seed of every random draw.")
    compare_without: tuple[str, ...] = setting((), "Adapters switched off for the frozen model "
                                               "(set when training on top of patches).")

    def __post_init__(self) -> None:
        check_choice("train", self.train, TRAIN_MODES)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_number("learning rate (lr)", self.lr, strict=True)
        check_number("negative_guidance", self.negative_guidance, strict=True)
        check_number("guidance_scale", self.guidance_scale)
        for name in ("iterations", "sample_steps", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FmnError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        self.lora_targets = tuple(self.lora_targets)
        self.compare_without = tuple(self.compare_without)
