"""Settings of skilled-neuron pruning (`prune`); `recipes/prune.yaml` and
`recipes/conceptworld-prune.yaml` set them per family and say why."""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.settings import check_choice, setting

SITES = ("ff", "resnet")
KEPT_SETS = ("", "conceptworld", "common")
SCORES = ("activity", "effect", "both")


@dataclass
class PruneConfig:
    sites: tuple[str, ...] = setting(("ff", "resnet"), "Where units may be pruned: 'ff' the "
                                     "hidden units of every transformer block's feed-forward, "
                                     "'resnet' the hidden channels of every resnet block "
                                     "(what the UNet draws with, whatever the prompt).")
    min_ratio: float = setting(1.15, "A unit is the concept's when its images drive it this "
                               "many times harder than any kept concept's samples do; below, "
                               "the unit is shared and pruning it costs the others.")
    score: str = setting("activity", "How a unit is read on each set of images: 'activity' "
                         "its peak |activation| (ConceptPrune's reading); 'effect' how far "
                         "switching it off moves the noise prediction, which is what pruning "
                         "costs a kept concept (one backward pass per probe); 'both' a "
                         "unit's lower ratio of the two, so it is taken only when the concept "
                         "both drives it and needs it more than any kept concept.", SCORES)
    fraction: float = setting(0.05, "The most units switched off, as a share of those at the "
                              "sites: the highest ratios first.")
    timesteps: tuple[float, ...] = setting((0.1, 0.3, 0.5, 0.7, 0.9), "Noise levels the "
                                           "activations are read at, as shares of the "
                                           "training schedule.")
    kept_set: str = setting("conceptworld", "Whose samples the units must stay quiet for: "
                            "'conceptworld' every other world concept; 'common' everyday "
                            "objects, animals and artists (UCE's list).", KEPT_SETS)
    preserve: tuple[str, ...] = setting((), "Prompts of your own whose samples the units must "
                                        "stay quiet for, each a kept group besides kept_set's.")
    kept_prompts: int = setting(4, "Prompts per kept concept; the base model draws one sample "
                                "of each.")
    concept_samples: int = setting(8, "Without reference images: the base model's samples of "
                                   "the concept's prompts read instead, this many.")
    sample_steps: int = setting(25, "Denoising steps of the kept samples.")
    seed: int = setting(0, "Seed of the kept samples and the noise.")

    def __post_init__(self) -> None:
        check_choice("kept_set", self.kept_set, KEPT_SETS)
        check_choice("score", self.score, SCORES)
        self.sites = tuple(self.sites)
        self.preserve = tuple(self.preserve)
        if any(not isinstance(p, str) or not p.strip() for p in self.preserve):
            raise FmnError("a preserved prompt is empty: pass prompts like 'a photo of a cat'")
        if not self.kept_set and not self.preserve:
            raise FmnError("nothing to keep: set kept_set (conceptworld or common) or give "
                           "preserve prompts")
        self.timesteps = tuple(float(t) for t in self.timesteps)
        if not self.sites or any(s not in SITES for s in self.sites):
            raise FmnError(f"sites must be a non-empty subset of {SITES}: {self.sites}")
        if not 0.0 < float(self.fraction) < 0.5:
            raise FmnError(f"fraction must be above 0 and below 0.5, got {self.fraction}: "
                           "prune a small share of the units (e.g. 0.01)")
        if not isinstance(self.min_ratio, (int, float)) or self.min_ratio <= 1.0:
            raise FmnError(f"min_ratio must be above 1, got {self.min_ratio}: a unit the kept "
                           "concepts drive as hard is not the concept's")
        if not self.timesteps or any(not 0.0 <= t < 1.0 for t in self.timesteps):
            raise FmnError(f"timesteps must be shares of the schedule in [0, 1), got "
                           f"{self.timesteps}")
        for name in ("kept_prompts", "sample_steps", "concept_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FmnError(f"{name} must be an integer >= 1, got {value}")
