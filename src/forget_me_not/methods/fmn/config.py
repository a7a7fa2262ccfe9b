"""Settings of Attention Re-steering (FMN). Defaults are the official recipe's where it has one.

`ResteerSettings` is the objective and the loop, shared by every method that trains with FMN's
attention loss (`fmn` on UNet weights, `token_rows` on token-embedding rows); `FmnConfig` adds
what trains in the UNet. The recipes (`recipes/*.yaml`) set these per use and say why.
"""

from __future__ import annotations

from dataclasses import dataclass

from forget_me_not.errors import FmnError
from forget_me_not.settings import check_choice, check_number, setting

REFERENCES = ("images", "self", "noise")
PRECISIONS = ("no", "fp16", "bf16")
PRESERVE_LATENTS = ("shared", "own")
STEPS_PER = ("run", "concept")
# Which positions besides the concept's own tokens are re-steered (see concepts.locate_tokens).
EXTRA_POSITIONS = ("none", "eot", "pooler", "padding")
TRAIN_MODES = ("lora", "xattn", "unet")
# All four cross-attention projections, as the paper's "cross-attention only" mode trains them.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Which UNet levels' part of a trained LoRA the patch keeps (see trainable.coarse_modules).
SHIP_LEVELS = ("all", "coarse")
PROMPT_SETS = ("", "conceptworld")
# What the erase term pushes the concept's prediction toward (see terms.Erase).
ERASE_NEUTRALS = ("empty", "prompt")


@dataclass
class ResteerSettings:
    """The attention loss, its references and the optional retention terms."""

    steps: int = setting(35, "Optimiser steps (the official recipe: 35 in total).")
    steps_per: str = setting("run", "'run': `steps` in total; 'concept': `steps` for each "
                             "concept of a joint run.", STEPS_PER)
    lr: float = setting(2e-6, "AdamW learning rate, constant.")
    weight_decay: float = setting(0.01, "AdamW decoupled weight decay; a larger one keeps the "
                                  "trained change small.")
    batch_size: int = setting(1, "Prompts per step.")
    max_grad_norm: float | None = setting(None, "Clip the gradient's global norm (null: off).")
    reference: str = setting("images", "Each step's clean latent: 'images' (VAE-encoded "
                             "references), 'self' (drawn by the model), 'noise' (zero latent).",
                             REFERENCES)
    n_self_images: int = setting(4, "reference=self: images drawn per concept.")
    self_steps: int = setting(25, "reference=self: denoising steps of those images.")
    extra_positions: str = setting(
        "none", "Positions re-steered besides the concept's tokens: 'eot' (the pooled token), "
        "'pooler' (every end-of-text id, as the official use_pooler), 'padding' (end-of-text "
        "and everything after it).", EXTRA_POSITIONS)
    seed: int = setting(0, "Seed of every random draw.")
    stop_pull: float = setting(
        0.0, "Stop once every concept's remaining pull is at most this: what its prompts add "
        "over the empty prompt (a concept with an anchor: over its prompts with the anchor) at "
        "high noise, where the layout is drawn, as a share of the base model's (1: as "
        "before, 0: gone); `steps` is then the most, and a run that never gets there keeps "
        "its lowest-pull state (0: run all `steps`).")
    stop_every: int = setting(10, "stop_pull > 0: steps between two readings of the pull.")
    mixed_precision: str = setting("no", "Autocast of the forward passes; trained tensors stay "
                                   "float32.", PRECISIONS)
    preserve_weight: float = setting(0.0, "Retention term: weight of the MSE between the "
                                     "trained and the base prediction on preserve prompts "
                                     "(0: off, the paper).")
    preserve_prompts: tuple[str, ...] = setting((), "Prompts the retention term keeps.")
    preserve_set: str = setting("", "A shipped prompt set added to the preserve prompts, the "
                                "targets' own words left out ('conceptworld': every other "
                                "world concept).", PROMPT_SETS)
    preserve_batch: int = setting(1, "Preserve prompts compared per step.")
    preserve_guidance: float = setting(
        0.0, "Retention term: hold the classifier-free-guided prediction (empty + scale x "
        "(prompt - empty)) at this scale, as sampling amplifies it, instead of the prompt's "
        "prediction alone (0: the prompt's alone).")
    preserve_latents: str = setting("shared", "Latents of the retention term: the target's "
                                    "('shared') or an image the base model draws per preserve "
                                    "prompt ('own').", PRESERVE_LATENTS)
    preserve_steps: int = setting(25, "Denoising steps of the images the base model draws for "
                                  "the retention, anchor and hold terms.")
    preserve_t_min: int = setting(0, "preserve_latents=own: lowest timestep compared (a colour "
                                  "or layout is settled at high noise).")
    transparent_weight: float = setting(1.0, "References with transparency: weight holding "
                                        "the prediction on transparent pixels to the base's.")
    anchor_prompts: tuple[str, ...] = setting((), "Anchor term: prompts the concept is pulled "
                                              "toward (Kumari et al. 2023).")
    anchor_weight: float = setting(0.0, "Weight of the anchor term (0: off).")
    concept_anchor_weight: float = setting(1.0, "Concepts that name an anchor: weight pulling "
                                           "each prompt toward the same prompt with the anchor.")
    concept_anchor_images: int = setting(4, "Images the base model draws per anchor prompt.")
    hold_prompts: tuple[str, ...] = setting((), "Set by training on top of patches: their "
                                            "concepts' prompts, held to what the patches make "
                                            "of them.")
    hold_weight: float = setting(1.0, "Weight of that hold.")
    compare_without: tuple[str, ...] = setting((), "Set by training on top of patches: "
                                               "adapters switched off for the base model.")
    also_avoid: tuple[str, ...] = setting((), "Words left out of the preserve prompts besides "
                                          "the targets'.")

    def __post_init__(self) -> None:
        check_choice("steps_per", self.steps_per, STEPS_PER)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("extra_positions", self.extra_positions, EXTRA_POSITIONS)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("preserve_latents", self.preserve_latents, PRESERVE_LATENTS)
        check_choice("preserve_set", self.preserve_set, PROMPT_SETS)
        for name in ("steps", "batch_size", "n_self_images", "self_steps", "preserve_batch",
                     "preserve_steps", "concept_anchor_images", "stop_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FmnError(f"{name} must be an integer >= 1, got {value}")
        if not isinstance(self.preserve_t_min, int) or self.preserve_t_min < 0:
            raise FmnError(f"preserve_t_min must be an integer >= 0, got {self.preserve_t_min}")
        check_number("learning rate (lr)", self.lr, strict=True)
        check_number("max_grad_norm", self.max_grad_norm, strict=True, optional=True)
        for name in ("stop_pull", "weight_decay", "preserve_weight", "preserve_guidance",
                     "transparent_weight", "anchor_weight", "concept_anchor_weight",
                     "hold_weight"):
            check_number(name, getattr(self, name))
        for name in ("preserve_prompts", "anchor_prompts", "hold_prompts", "compare_without",
                     "also_avoid"):
            setattr(self, name, tuple(getattr(self, name)))
        if any(not isinstance(p, str) or not p.strip() for p in self.preserve_prompts):
            raise FmnError("a preserve prompt is empty: pass prompts like 'a photo of a cat'")
        if any(not isinstance(p, str) or not p.strip() for p in self.anchor_prompts):
            raise FmnError("an anchor prompt is empty: pass prompts like 'a photo of a person'")
        if self.anchor_weight > 0 and not self.anchor_prompts:
            raise FmnError("anchor_weight > 0 needs anchor prompts: pass --toward PROMPT "
                           "(repeatable), or set the weight to 0")

    def total_steps(self, n_concepts: int) -> int:
        """Optimiser steps of a run over `n_concepts` concepts."""
        return self.steps * (max(1, n_concepts) if self.steps_per == "concept" else 1)


@dataclass
class FmnConfig(ResteerSettings):
    """FMN on the UNet: what trains, and the text-side retention term a LoRA allows."""

    train: str = setting("unet", "What trains: 'unet' (every UNet weight, the official "
                         "recipe), 'xattn' (cross-attention weights), 'lora' (a LoRA on "
                         "cross-attention: a patch of a few MB).", TRAIN_MODES)
    lora_rank: int = setting(4, "train=lora: LoRA rank.")
    lora_alpha: float | None = setting(None, "train=lora: LoRA alpha (null: equal to the rank, "
                                       "scale 1).")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, "train=lora: projections of each "
                                            "cross-attention layer that get a LoRA.")
    ship_levels: str = setting("all", "train=lora: which levels' part of the trained LoRA the "
                               "patch keeps. 'coarse': all but the finest level that has "
                               "cross-attention. It trains at every level and shares the erase "
                               "target's fine detail; the coarser levels decide what is drawn, "
                               "the finest renders the texture every other concept shares (P+, "
                               "Voynov et al. 2023).", SHIP_LEVELS)
    text_keep_weight: float = setting(0.0, "train=lora: weight of the penalty on what the "
                                      "LoRA on to_k/to_v does to the preserve prompts' text "
                                      "states (0: off).")
    restarts: int = setting(
        1, "Runs trained from seeds seed, seed+1, ...; the patch keeps the one whose concepts' "
        "remaining pull (see stop_pull) is lowest at its end, read on the same latents for "
        "every run and on the levels the patch ships. A fixed-step run ends wherever its last "
        "draws leave it; the pull, read without any judge, picks a run that let go (1: one "
        "run).")
    adversarial_every: int = setting(0, "Robust mode: every this many steps, a token per "
                                     "concept is learnt by inversion on the model being trained "
                                     "and re-steered beside the word (0: off).")
    adversarial_steps: int = setting(10, "Robust mode: inversion steps per concept at each "
                                     "refresh (the token is kept between refreshes).")
    adversarial_lr: float = setting(5e-3, "Robust mode: the inversion's Adam learning rate.")
    erase_weight: float = setting(0.0, "Weight of the erase term: on the concept's images, the "
                                  "prediction through its prompts (and the adversary's tokens) "
                                  "pulled to the base model's unprompted one, as ESD does (0: "
                                  "off).")
    erase_guidance: float = setting(1.0, "Erase term: negative guidance (ESD's eta) pushing "
                                    "away from what the base model draws for the concept.")
    erase_neutral: str = setting(
        "empty", "Erase term: the prediction the concept's is pulled to. 'empty': the "
        "unprompted one (ESD's); 'prompt': the same prompt with the concept's words taken out "
        "(or put as its anchor), so the prompt's other words (subject, colour, setting) are "
        "kept and only the concept's pull is removed.", ERASE_NEUTRALS)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train", self.train, TRAIN_MODES)
        check_choice("erase_neutral", self.erase_neutral, ERASE_NEUTRALS)
        check_choice("ship_levels", self.ship_levels, SHIP_LEVELS)
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise FmnError(f"restarts must be an integer >= 1, got {self.restarts}")
        if not isinstance(self.adversarial_every, int) or self.adversarial_every < 0:
            raise FmnError(f"adversarial_every must be an integer >= 0, got "
                           f"{self.adversarial_every}")
        if not isinstance(self.adversarial_steps, int) or self.adversarial_steps < 1:
            raise FmnError(f"adversarial_steps must be an integer >= 1, got "
                           f"{self.adversarial_steps}")
        check_number("adversarial_lr", self.adversarial_lr, strict=True)
        check_number("erase_weight", self.erase_weight)
        check_number("erase_guidance", self.erase_guidance)
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise FmnError(f"lora_rank must be an integer >= 1, got {self.lora_rank}")
        check_number("lora_alpha", self.lora_alpha, strict=True, optional=True)
        check_number("text_keep_weight", self.text_keep_weight)
        self.lora_targets = tuple(self.lora_targets)
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if not self.lora_targets or bad:
            raise FmnError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}: {bad}")
        if self.compare_without and self.train != "lora":
            raise FmnError("training on top of other patches needs train=lora: stack the "
                           "patches afterwards with `fmn patch stack` instead")
