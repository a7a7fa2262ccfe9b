"""Settings of RECE, named as the official `train.py` / `train_object.py` name them."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.methods.uce.config import UceConfig
from forget_me_not.settings import check_number, setting


@dataclass
class ReceConfig(UceConfig):
    """UCE's settings (its first edit), and those of the adversarial rounds after it."""

    epochs: int = setting(1, "Adversarial rounds after the UCE edit (--epochs; the paper: 1 for "
                          "objects and styles, 2-3 for nudity).")
    regular_scale: float = setting(1e-3, "Ridge of each round's embedding, pulled toward zero "
                                   "(--regular_scale; the paper: 1e-3 for styles and objects "
                                   "UCE leaves drawn, 1e-1 for easy ones and nudity).")
    round_erase_scale: float = setting(1.0, "Weight of the derived embeddings in each round's "
                                       "solve (--erase_scale).")
    round_preserve_scale: float = setting(0.1, "Weight of the preserved states in each round's "
                                          "solve (--preserve_scale).")
    round_lamb: float = setting(0.1, "Weight keeping the current weights in each round's "
                                "solve (--lamb).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise FmnError(f"epochs must be an integer >= 0, got {self.epochs}")
        for name in ("regular_scale", "round_erase_scale", "round_preserve_scale", "round_lamb"):
            check_number(name, getattr(self, name))
        if self.round_erase_scale == 0:
            raise FmnError("round_erase_scale 0 erases nothing in the rounds: set it above 0")
