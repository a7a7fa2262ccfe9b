"""Settings of `token_rows`: FMN's loop and terms, trained on the concept's token rows."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.methods.fmn.config import ResteerSettings
from forget_me_not.settings import setting


@dataclass
class TokenRowsConfig(ResteerSettings):
    """A token row is one vector per word: it takes a textual-inversion-sized step."""

    lr: float = setting(5e-3, "AdamW learning rate of the row deltas, constant.")
