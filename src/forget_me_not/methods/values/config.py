"""Settings of value-space erasure (`values`); `recipes/values.yaml` and
`recipes/conceptworld-values.yaml` set them per family and say why."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.settings import check_choice, check_number, setting

TARGETS = ("to_k", "to_v")
OUTPUTS = ("lora", "delta")
PRESERVE_SETS = ("", "conceptworld", "common")
CONTEXT_SETS = ("", "conceptworld", "common")


@dataclass
class ValuesConfig:
    targets: tuple[str, ...] = setting(("to_v",), "Projections of each attn2 whose outputs "
                                       "lose the concept's directions (the values carry what "
                                       "is drawn; the keys only where).")
    directions: int = setting(1, "Directions removed per layer for the concept's own prompts "
                              "(the first carries most of a concept; more cost the others).")
    contexts: str = setting("", "Prompts the concept's directions are read from besides its "
                            "templates: a causal text encoder writes the prompt's other words "
                            "into the concept's states ('conceptworld': the world's own caption "
                            "forms for it; 'common': everyday settings, colours and styles).",
                            CONTEXT_SETS)
    contexts_per_concept: int = setting(60, "contexts conceptworld: caption forms per concept.")
    rounds: int = setting(0, "Adversarial rounds: each learns a token by textual inversion on "
                          "the current edit and removes the direction it draws through "
                          "(0: the concept's own prompts only).")
    round_directions: int = setting(1, "Directions removed per layer in each round.")
    round_steps: int = setting(150, "Textual-inversion steps of each round's token.")
    round_lr: float = setting(1e-3, "Textual inversion's learning rate in the rounds.")
    ridge: float = setting(0.01, "Added to the kept outputs' second moment before whitening, as "
                           "a share of its mean variance: a direction no kept prompt uses does "
                           "not look free.")
    worst_prompt: bool = setting(False, "Choose each round's direction against the kept prompt "
                                 "that would lose most, not the kept prompts' average.")
    preserve: tuple[str, ...] = setting((), "Prompts whose cross-attention outputs are kept "
                                        "(the empty prompt always is: guidance subtracts it).")
    preserve_set: str = setting("", "A shipped list added to `preserve`, the targets' words left "
                                "out ('conceptworld': every other world concept's prompts; "
                                "'common': everyday objects, animals and artists, bare and in "
                                "the concept's templates).", PRESERVE_SETS)
    preserve_per_concept: int = setting(6, "preserve_set conceptworld: prompts per kept "
                                        "concept.")
    output: str = setting("lora", "'lora': the exact low-rank edit as a LoRA plain diffusers "
                          "loads; 'delta': full-weight deltas.", OUTPUTS)
    seed: int = setting(0, "Seed of the rounds' inversions.")

    def __post_init__(self) -> None:
        check_choice("preserve_set", self.preserve_set, PRESERVE_SETS)
        check_choice("output", self.output, OUTPUTS)
        check_choice("contexts", self.contexts, CONTEXT_SETS)
        self.targets = tuple(self.targets)
        self.preserve = tuple(self.preserve)
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise FmnError(f"targets must be a non-empty subset of {TARGETS}: {self.targets}")
        for name in ("directions", "round_directions", "round_steps", "preserve_per_concept",
                     "contexts_per_concept"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FmnError(f"{name} must be an integer >= 1, got {value}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise FmnError(f"rounds must be an integer >= 0, got {self.rounds}")
        check_number("round_lr", self.round_lr, strict=True)
        check_number("ridge", self.ridge, strict=True)
        if any(not isinstance(p, str) or not p.strip() for p in self.preserve):
            raise FmnError("a preserved prompt is empty: pass prompts like 'a photo of a cat'")
