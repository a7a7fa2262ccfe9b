"""Settings of UCE, named as the official `uce_sd_erase.py` names them."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.settings import check_choice, check_number, setting

OUTPUTS = ("lora", "delta")
TARGETS = ("to_k", "to_v")
PRESERVE_SETS = ("", "conceptworld", "common")
STATES = ("last", "tail")


@dataclass
class UceConfig:
    anchor: str = setting("", "What each concept is edited toward (its guide concept): words, or "
                          "'' for the empty prompt; a concept's own anchor wins.")
    style_anchor: str = setting("art", "What styles are edited toward (the official script "
                                "guides 'art' concepts to 'art').")
    preserve: tuple[str, ...] = setting((), "Concepts whose text states keep their outputs.")
    preserve_set: str = setting("", "A shipped list added to `preserve`, the targets left out "
                                "('conceptworld': every other world concept; 'common': everyday "
                                "objects, animals and artists).", PRESERVE_SETS)
    preserve_in_context: bool = setting(False, "Also preserve each preserved concept inside "
                                        "the erased concepts' templates, at the same states "
                                        "the edit uses (with states=tail: its padding too).")
    erase_scale: float = setting(1.0, "Weight of the erased concepts' terms.")
    preserve_scale: float = setting(1.0, "Weight of the preserved concepts' terms.")
    lamb: float = setting(0.5, "Weight keeping every other direction of the weights (lambda).")
    expand_prompts: bool = setting(False, "Also edit the concept inside the category's "
                                   "templates (one more text state per template).")
    states: str = setting("last", "Which text states are edited: 'last' (the concept's last "
                          "token, as the official script), 'tail' (its tokens and every "
                          "end-of-text and padding position after them, where a causal text "
                          "encoder also writes the concept).", STATES)
    targets: tuple[str, ...] = setting(TARGETS, "Projections of each attn2 that are edited.")
    output: str = setting("lora", "'lora': the exact low-rank edit as a LoRA plain diffusers "
                          "loads; 'delta': full-weight deltas.", OUTPUTS)
    seed: int = setting(0, "Recorded only: the closed form draws nothing at random.")

    def __post_init__(self) -> None:
        check_choice("output", self.output, OUTPUTS)
        check_choice("preserve_set", self.preserve_set, PRESERVE_SETS)
        check_choice("states", self.states, STATES)
        for name in ("erase_scale", "preserve_scale", "lamb"):
            check_number(name, getattr(self, name))
        if self.erase_scale == 0:
            raise FmnError("erase_scale 0 edits nothing: set it above 0")
        self.preserve = tuple(self.preserve)
        self.targets = tuple(self.targets)
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise FmnError(f"targets must be a non-empty subset of {TARGETS}: {self.targets}")
        if any(not p.strip() for p in self.preserve):
            raise FmnError("a preserved concept is empty: pass words like 'a cat'")
