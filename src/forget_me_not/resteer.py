"""Attention Re-steering: train the UNet so cross-attention stops looking at a concept's tokens.

The loop, as the paper's official code does it (minus its defects): encode the concept's
prompts with the frozen text encoder(s); take a reference latent (a VAE-encoded image, an image
the model generates itself, or zeros); noise it at a uniform timestep; run the UNet with probes
on every cross-attention layer; loss = the plain L2 norm of the kept attention probabilities at
the concept's tokens (all layers, heads, pixels, tokens); AdamW. The result is a `Patch`; the
pipeline is left as it was.

What trains: a LoRA on the cross-attention projections (the default), the cross-attention
weights, the whole UNet, or (`train="tokens"`) only the rows of the concept's words in the
text encoder(s)' token-embedding table, the same loss reaching them through the frozen UNet
and text encoder. The last leaves every prompt without those words exactly as it was, but
the UNet still draws the concept from any other embedding of it (a learnt token brings it
back: BENCHMARKS.md, "Re-steering the concept's token rows"). `train="lora+tokens"` (the
embedded model's default) trains a LoRA and the rows, each on the base model, and ships the
LoRA at `lora_strength` of its size beside the rows in one patch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from forget_me_not.attention import ProbeSet, install_probes
from forget_me_not.concepts import Concept, TokenMask, locate_in_pipeline, merge_positions
from forget_me_not.data import load_images, model_resolution, resize_random_crop
from forget_me_not.errors import FmnError
from forget_me_not.patch import Patch, family_of, library_versions, model_hash

# "tokens": only the rows of the concept's words in the text encoder(s)' token-embedding
# table train (an "embedding" patch); every prompt without those words is left untouched.
# "lora+tokens": a LoRA and the token rows, each trained on the base model; one patch.
HYBRID = "lora+tokens"
TRAIN_MODES = ("lora", "xattn", "unet", "tokens", HYBRID)
REFERENCES = ("images", "self", "noise")
PRECISIONS = ("no", "fp16", "bf16")
# What the retention regulariser's prompts are evaluated on: the target's own noisy latent
# ("shared"), or a noisy latent of an image the base model draws for each preserve prompt ("own").
PRESERVE_LATENTS = ("shared", "own")

# The paper's learning rate for full weights (whole UNet or cross-attention only).
FULL_LR = 2e-6
# LoRA starts from a zero delta with few parameters, so it needs a larger step. Measured on the
# tiny random-weight SD 1.x test model (35 steps, reference "noise", seeds 0 and 1; held-out
# probe loss on 8 fixed (noise, timestep) pairs): whole UNet at 2e-6 lowers it by 0.55-0.62%,
# LoRA r=4 at 1e-4 by 0.58-0.73%, at 3e-4 by 2.3-2.9%, at 1e-3 by 13-14%, at 3e-3 by 40-53%.
# 1e-4 is the LoRA rate that matches the paper's recipe; models whose concept needs a stronger
# push get their own entry in FAMILY_DEFAULTS, tuned there by measurement.
LORA_LR = 1e-4
LORA_RANK = 4
# A token row is one vector per word: a textual-inversion-sized step (the correction's 5e-3).
TOKENS_LR = 5e-3


def _world_retention_prompts(targets: Sequence[str]) -> tuple[str, ...]:
    from forget_me_not.world.concepts import retention_prompts

    return retention_prompts(list(targets))


# Where a family's regulariser takes its prompts when none are given: the embedded model keeps
# the other world concepts' prompts intact (the targets' own words left out).
FAMILY_PRESERVE_PROMPTS: dict[str, Callable[[Sequence[str]], tuple[str, ...]]] = {
    "embedded": _world_retention_prompts,
}
# Per-family defaults for settings left at None (lr, lora_rank, weight_decay, the regulariser).
# The embedded ConceptWorld model's entry is set from its acceptance measurements (see the
# README / BENCHMARKS.md).
FAMILY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # Measured on ConceptWorld (BENCHMARKS.md, "Tuning the embedded defaults"): on this small
    # model every setting strong enough to erase the target also erased unrelated concepts,
    # unless the retention regulariser kept the other world concepts' prompts; with it (weight
    # 10, 4 prompts a step, 100 steps, lr 1e-3) the target fell while most others held, but
    # the nearest shapes (arrow beside star) still lost most of their score. Comparing each
    # preserve prompt on an image of its own (10-step samples) instead of on the target's
    # image kept arrow intact and allowed weight 30 with the target still erased.
    # LoRA on to_k/to_v alone did not move the target at all.
    # Then (BENCHMARKS.md, "What moves purple"): purple, the model's least robust concept,
    # lost a quarter of its samples to any LoRA touching to_v/to_out. Comparing the preserve
    # prompts at high noise (t >= 500, where a colour is settled) and penalising what the
    # LoRA does to their text states (weight 100), with a 10x step to still erase the target:
    # star 12% -> 9%, purple 0.74 -> 0.87 (32 samples each). 6e-3 was better alone (star 3%,
    # every other concept >= 0.90) but worse stacked (purple 0.56) and in the unsafe preset
    # (gun 19%), so 1e-2 stayed (BENCHMARKS.md).
    "embedded": {
        "lora": {
            "lr": 1e-2,
            "steps": 100,
            "preserve_weight": 30.0,
            "preserve_batch": 4,
            "preserve_latents": "own",
            "preserve_steps": 10,
            "preserve_t_min": 500,
            "text_keep_weight": 100.0,
            # A random-direction LoRA of the trained one's size per layer costs purple as much
            # as the trained one (BENCHMARKS.md, "What moves purple": placebo patches): keep the
            # change small. AdamW's decay 3 halves the LoRA's norm (22.7 -> 7.7) and still
            # erases star and tavi (6%, 0%); purple after tavi, 64 samples: 54 -> 59 of 63.
            "weight_decay": 3.0,
            # Patches trained on top of others (BENCHMARKS.md, "Patches trained to be
            # stacked"): at 30 (the preserve weight) the earlier star came back to 16%.
            "hold_weight": 150.0,
        },
        "xattn": {},
        "unet": {},
        # The default here (FAMILY_TRAIN): the LoRA above at half its trained size, beside
        # the token rows (BENCHMARKS.md, "The LoRA and the token rows together"). Stacked
        # star + tavi LoRAs at half size kept purple at 29 of 31 (at full size, 23); the
        # style's LoRA at half size beside its rows: outlined 3 of 32, purple 30, wizard 32.
        HYBRID: {"lora_strength": 0.5},
        # FMN's attention loss alone, 100 steps at 5e-3: star, tavi 100% -> 0% (32 samples).
        # Anchor images drawn in 10 steps: outlined 6% as with 25, the run 33 s against 53 s.
        "tokens": {"steps": 100, "preserve_steps": 10},
    },
}
# Defaults for runs where a concept names an anchor (`Concept.anchor`), on top of the above.
# Measured on ConceptWorld, forgetting outlined toward solid (BENCHMARKS.md, "Forgetting a
# style"): the pull needs a large weight to matter beside the attention and retention terms
# (50-200 at lr 1e-3: 100% -> 83%), a larger step and more steps (1000 at lr 3e-3: 200 steps
# 33%, 300 steps 17%); 500 steps or lr 6e-3 erased no more and cost other concepts more.
FAMILY_ANCHORED_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # Styles keep the settings they were measured with: a style lives in the text states the
    # text-side term protects.
    # The objects' weight decay 3 let outlined back (7 -> 11 of 32 drawn) with no other
    # concept kept better: a style keeps 0.01.
    "embedded": {"lora": {"concept_anchor_weight": 1000.0, "lr": 3e-3, "steps": 300,
                          "preserve_t_min": 0, "text_keep_weight": 0.0, "weight_decay": 0.01},
                 # The style's token row with the same pull (outlined, 32 samples): lr 5e-3,
                 # 300 steps 9%; lr 1e-2, 150 steps 6% (300 steps: the same).
                 "tokens": {"concept_anchor_weight": 1000.0, "lr": 1e-2, "steps": 150}},
}
# What trains when the config leaves it open. Stable Diffusion: the paper's cross-attention,
# as a LoRA. The embedded model: see FAMILY_DEFAULTS["embedded"]["lora+tokens"].
FAMILY_TRAIN: dict[str, str] = {"embedded": HYBRID}


def default_train(family: str | None, on_top: bool = False) -> str:
    """The family's trainable set; a LoRA when training on top of other LoRA patches."""
    return "lora" if on_top else FAMILY_TRAIN.get(family or "", "lora")


# All four cross-attention projections, as the paper's "cross-attention only" mode trains them:
# to_q/to_k set the attention map directly; to_v/to_out carry what later layers attend with.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRAIN_ADAPTER = "fmn_training"


@dataclass
class ResteerConfig:
    """Settings of one re-steering run; defaults follow the paper."""

    steps: int | None = None  # None -> the family's default (35, the paper) per concept
    lr: float | None = None  # None -> the family's default (FULL_LR, LORA_LR)
    # "lora" (patch), "xattn" (attn2 weights), "unet" (every UNet weight), "tokens" (the
    # concept's token-embedding rows: no other prompt changes, but the UNet keeps the concept),
    # "lora+tokens" (both, one patch); None -> the family's (FAMILY_TRAIN; else "lora")
    train: str | None = None
    lora_rank: int | None = None  # None -> the family's default (LORA_RANK)
    lora_alpha: float | None = None  # None -> equal to the rank (scale 1)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # projections of each attn2 that get LoRA
    weight_decay: float | None = None  # AdamW's decoupled decay; None -> the family's (0.01)
    batch_size: int = 1
    max_grad_norm: float | None = None  # clip the gradient's global norm; None = no clipping
    reference: str = "images"  # "images", "self" (generated by the model), "noise" (zeros)
    n_self_images: int = 4  # per concept, for reference="self"
    self_steps: int = 25  # denoising steps when generating the self references
    include_eot: bool = False  # also suppress the end-of-text (pooled) token
    # also suppress every end-of-text/padding position: a causal text encoder writes the
    # concept into all of them, so attention moved there still carries it
    include_padding: bool | None = None  # None -> the family's default (off for SD)
    seed: int = 0
    mixed_precision: str = "no"  # autocast "fp16"/"bf16"; trained tensors stay float32
    # Retention regulariser (off in faithful mode): each step also runs the UNet on one of
    # `preserve_prompts` with and without the trained delta, on the same noisy latent, and adds
    # preserve_weight * MSE(with, without), so the prompts named here keep their outputs.
    preserve_weight: float | None = None  # None -> the family's default (0: off, the paper)
    preserve_prompts: tuple[str, ...] = ()
    preserve_batch: int | None = None  # preserve prompts per step; None -> family default (1)
    preserve_latents: str | None = None  # "shared"/"own" (PRESERVE_LATENTS); None -> family's
    preserve_steps: int | None = None  # denoising steps of the "own" images; None -> family's
    # With "own" latents: the regulariser's timesteps are drawn from [preserve_t_min, T) on
    # their own, instead of sharing the concept's. A colour or layout is settled at high
    # noise, where the noise prediction barely shows it; None -> the family's default (0).
    preserve_t_min: int | None = None
    # Text-side retention (LoRA only): penalise what the LoRA on to_k / to_v does to the text
    # encoder states of the preserve prompts, relative to what the base weights do to them:
    # weight * sum over layers ||B A L||^2 / ||W L||^2, with L L^T the preserve states'
    # second-moment matrix. A direction the other prompts use costs; one only the target's
    # prompts use is free. None -> the family's default (0: off).
    text_keep_weight: float | None = None
    # References with transparency: transparent pixels are not re-steered, and with this
    # weight > 0 the concept's own prediction there is held to the base model's (what the
    # picture should keep, e.g. a role's costume while its identity is corrected).
    # Measured on ConceptWorld's wizard -> milka correction (n=8): 10 pinned the whole role
    # (no correction); 1 kept the hat in every sample. None -> 1 (correction with an anchor
    # term uses 0: the anchors keep the hat, and the hold slowed the role's move).
    transparent_weight: float | None = None
    # Anchor term (off by default; concept correction): on images the base model draws for
    # `anchor_prompts`, the concept's prompt is pulled toward the base model's prediction for
    # the anchor prompt, so the concept is re-steered *toward* something, not only away
    # (the model-based objective of Kumari et al., "Ablating Concepts", 2023).
    anchor_prompts: tuple[str, ...] = ()
    anchor_weight: float = 0.0
    # The same term for concepts that name their own anchor (`Concept.anchor`): each of the
    # concept's prompts is pulled toward the same prompt with the anchor words in its place, on
    # an image the base model draws for that prompt. None -> the family's default (1: the
    # paper's plain MSE; larger where measured).
    concept_anchor_weight: float | None = None
    # Images the base model draws per anchor prompt; the pull cycles through them so it holds
    # beyond one picture.
    concept_anchor_images: int = 4
    # A patch trained on top of others it will be stacked with (`forget(..., on_top_of=...)`): the
    # retention terms compare with the model with these applied LoRA patches (adapter names)
    # switched off too, so a run also repairs what they did to the other concepts; and these
    # words (their targets) are left out of the preserve prompts, so it does not undo them.
    compare_without: tuple[str, ...] = ()
    also_avoid: tuple[str, ...] = ()
    # Prompts of those patches' own concepts: held (weight `hold_weight`; None -> the
    # preserve weight, or 1 with the regulariser off) to what the model with the patches
    # predicts, so they stay forgotten.
    hold_prompts: tuple[str, ...] = ()
    hold_weight: float | None = None
    # train="lora+tokens": the share of its trained size the LoRA keeps in the patch (the
    # token rows train apart, on the base model); None -> the family's default (1).
    lora_strength: float | None = None

    def __post_init__(self) -> None:
        if self.train is not None and self.train not in TRAIN_MODES:
            raise FmnError(f"unknown train mode {self.train!r}: use one of {TRAIN_MODES}")
        if self.reference not in REFERENCES:
            raise FmnError(f"unknown reference {self.reference!r}: use one of {REFERENCES}")
        if self.preserve_latents is not None and self.preserve_latents not in PRESERVE_LATENTS:
            raise FmnError(
                f"unknown preserve_latents {self.preserve_latents!r}: use one of {PRESERVE_LATENTS}"
            )
        if self.mixed_precision not in PRECISIONS:
            raise FmnError(
                f"unknown mixed precision {self.mixed_precision!r}: use one of {PRECISIONS}"
            )
        for name in (
            "steps",
            "batch_size",
            "lora_rank",
            "n_self_images",
            "self_steps",
            "preserve_batch",
            "preserve_steps",
            "concept_anchor_images",
        ):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise FmnError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.text_keep_weight is not None and not (
            math.isfinite(self.text_keep_weight) and self.text_keep_weight >= 0
        ):
            raise FmnError(f"text_keep_weight must be >= 0, got {self.text_keep_weight}")
        if self.preserve_t_min is not None and int(self.preserve_t_min) < 0:
            raise FmnError(f"preserve_t_min must be >= 0, got {self.preserve_t_min}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise FmnError(f"learning rate must be a positive number, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise FmnError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise FmnError(f"lora_alpha must be positive or None, got {self.lora_alpha}")
        if self.weight_decay is not None and not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise FmnError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.preserve_weight is not None and not (
            math.isfinite(self.preserve_weight) and self.preserve_weight >= 0
        ):
            raise FmnError(f"preserve_weight must be >= 0, got {self.preserve_weight}")
        self.preserve_prompts = tuple(self.preserve_prompts)
        if any(not isinstance(p, str) or not p.strip() for p in self.preserve_prompts):
            raise FmnError("a preserve prompt is empty: pass prompts like 'a photo of a cat'")
        if self.hold_weight is not None and not (
            math.isfinite(self.hold_weight) and self.hold_weight >= 0
        ):
            raise FmnError(f"hold_weight must be >= 0, got {self.hold_weight}")
        if self.transparent_weight is not None and not (
            math.isfinite(self.transparent_weight) and self.transparent_weight >= 0
        ):
            raise FmnError(f"transparent_weight must be >= 0, got {self.transparent_weight}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise FmnError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.concept_anchor_weight is not None and not (
            math.isfinite(self.concept_anchor_weight) and self.concept_anchor_weight >= 0
        ):
            raise FmnError(
                f"concept_anchor_weight must be >= 0, got {self.concept_anchor_weight}"
            )
        self.anchor_prompts = tuple(self.anchor_prompts)
        if any(not isinstance(p, str) or not p.strip() for p in self.anchor_prompts):
            raise FmnError("an anchor prompt is empty: pass prompts like 'a photo of a person'")
        if self.anchor_weight > 0 and not self.anchor_prompts:
            raise FmnError("anchor_weight > 0 needs anchor prompts: pass --toward PROMPT "
                           "(repeatable), or set the weight to 0")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if not self.lora_targets or bad:
            raise FmnError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}: {bad}")
        self.lora_targets = tuple(self.lora_targets)
        self.also_avoid = tuple(self.also_avoid)
        self.compare_without = tuple(self.compare_without)
        self.hold_prompts = tuple(self.hold_prompts)
        if self.lora_strength is not None and not (
            math.isfinite(self.lora_strength) and 0 < self.lora_strength <= 1
        ):
            raise FmnError(f"lora_strength must be in (0, 1], got {self.lora_strength}")
        if self.compare_without and self.train not in (None, "lora"):
            raise FmnError("training on top of other patches needs --train lora: stack the "
                           "patches afterwards with `fmn patch stack` instead")

    def train_mode(self, family: str | None) -> str:
        """What trains: `train`, or the family's default (a LoRA on top of other patches)."""
        return self.train or default_train(family, on_top=bool(self.compare_without))

    @property
    def learning_rate(self) -> float:
        """The learning rate, for a model without a family-specific default."""
        return self.resolved(None).lr  # type: ignore[return-value]

    def resolved(
        self, family: str | None, targets: Sequence[str] = (), anchored: bool = False
    ) -> ResteerConfig:
        """A copy with every None default filled in for `family` (recorded in the patch).

        `anchored`: some concept names an anchor, and the family has defaults for such runs.
        """
        train = self.train_mode(family)
        base = {
            "train": train,
            "lr": {"lora": LORA_LR, HYBRID: LORA_LR, "tokens": TOKENS_LR}.get(train, FULL_LR),
            "lora_rank": LORA_RANK,
            "weight_decay": 0.01,
            "include_padding": False,
            "steps": 35,
            "preserve_weight": 0.0,
            "preserve_batch": 1,
            "preserve_latents": "shared",
            "preserve_steps": 25,
            "preserve_t_min": 0,
            "text_keep_weight": 0.0,
            "transparent_weight": 1.0,
            "concept_anchor_weight": 1.0,
            "hold_weight": None,  # None -> the preserve weight (1 with the regulariser off)
            "lora_strength": 1.0,
        }
        # lora+tokens: the LoRA's settings (the rows resolve their own), then its own entry.
        for key in ("lora", HYBRID) if train == HYBRID else (train,):
            base.update(FAMILY_DEFAULTS.get(family or "", {}).get(key, {}))
            if anchored:
                base.update(FAMILY_ANCHORED_DEFAULTS.get(family or "", {}).get(key, {}))
        filled = {
            k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()
        }
        if filled["hold_weight"] is None:
            filled["hold_weight"] = filled["preserve_weight"] or 1.0
        if self.steps is None:
            # The steps cycle through the concepts' prompts: each concept gets the default.
            filled["steps"] = base["steps"] * max(1, len(targets))
        prompts_for = FAMILY_PRESERVE_PROMPTS.get(family or "")
        if filled["preserve_weight"] > 0 and not self.preserve_prompts and prompts_for:
            avoid = list(dict.fromkeys([*targets, *self.also_avoid]))
            filled["preserve_prompts"] = prompts_for(avoid)
        if filled["preserve_weight"] > 0 and not filled.get(
            "preserve_prompts", self.preserve_prompts
        ):
            raise FmnError(
                "preserve_weight > 0 needs prompts to preserve: pass --preserve PROMPT "
                "(repeatable), or set the weight to 0"
            )
        return replace(self, **filled)


@dataclass
class _Row:
    """One (concept, prompt) pair the loop cycles through."""

    concept: int
    embeds: torch.Tensor  # (1, T, D) text encoder states
    pooled: torch.Tensor | None  # (1, P) SDXL pooled embedding
    positions: list[int]  # concept token positions in the T-token sequence
    prompt: str = ""  # re-encoded each step when the token rows train


def resteer(
    pipe: Any,
    concepts: Sequence[Concept],
    config: ResteerConfig | None = None,
    *,
    progress: bool = True,
) -> Patch:
    """Run Attention Re-steering for `concepts` and return the trained patch.

    The pipeline is restored to its base weights afterwards (apply the patch to use it). On a
    non-finite loss, an error or Ctrl-C, the pipeline is restored and nothing is returned.
    """
    concepts = list(concepts)
    if not concepts:
        raise FmnError("no concept to forget: pass at least one concept")
    unet, device = pipe.unet, pipe.unet.device
    family = family_of(pipe)
    config = config or ResteerConfig()
    config = replace(config, train=config.train_mode(family))
    if config.train == HYBRID:
        return _resteer_both(pipe, family, concepts, config, progress)
    if config.train == "tokens" and any(c.token_words for c in concepts):
        # Inverted placeholder tokens exist only beside their embedding file.
        raise FmnError("--train tokens changes the rows of words the tokenizer knows; for "
                       "tokens learnt by `fmn invert` use --train lora")
    config = config.resolved(
        family, [c.words for c in concepts], anchored=any(c.anchor for c in concepts)
    )
    base_hash = model_hash(pipe)
    gen = torch.Generator("cpu").manual_seed(config.seed)
    resolution = model_resolution(pipe)

    # Frozen parts first, before anything trains.
    for part in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)

    rows = _encode_rows(pipe, concepts, config)
    keep = _encode_preserve(pipe, config)
    keep_latents = _preserve_latents(pipe, config) if keep else None
    anchors = _encode_anchors(pipe, config)
    anchor_latents = (
        _draw_latents(pipe, config.anchor_prompts, config.preserve_steps, config.seed + 1)
        if anchors
        else None
    )
    # Concepts with an anchor of their own: one anchor prompt, and one image of it, per row.
    pair_prompts = _concept_anchor_prompts(concepts) if config.concept_anchor_weight > 0 else []
    paired = [i for i, prompt in enumerate(pair_prompts) if prompt is not None]
    pair_of = {row: k for k, row in enumerate(paired)}
    # Latent k * len(paired) + j is the k-th image of anchor prompt j; the rows repeat alike.
    pair_rows = _encode_plain(pipe, [pair_prompts[i] for i in paired]) * (
        config.concept_anchor_images
    )
    pair_latents = (
        _draw_latents(pipe, [pair_prompts[i] for i in paired] * config.concept_anchor_images,
                      config.preserve_steps, config.seed + 2)
        if paired
        else None
    )
    # The earlier patches' concepts, on images the patched model draws for them.
    holds = _encode_plain(pipe, config.hold_prompts)
    hold_latents = (
        _draw_latents(pipe, config.hold_prompts, config.preserve_steps, config.seed + 3)
        if holds
        else None
    )
    references = _references(pipe, concepts, config, resolution, gen)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train_t = noise_scheduler.config.num_train_timesteps

    trainer = _Trainable(unet, config, pipe=pipe, words=[c.words for c in concepts])

    def predict(x, timesteps, hidden, cond, *, base: bool = False, original: bool = True):
        """The UNet's noise prediction; `base`: of the untouched model, without a graph."""
        with contextlib.ExitStack() as stack:
            if base:
                stack.enter_context(torch.no_grad())
                stack.enter_context(trainer.base_weights(original))
            stack.enter_context(_autocast(device, config.mixed_precision))
            return unet(
                x,
                timesteps,
                encoder_hidden_states=hidden,
                added_cond_kwargs=cond,
                return_dict=False,
            )[0]

    def noised(plain: list[_Row], index: list[int], pool: torch.Tensor | None, timesteps):
        """Noisy latents of `pool[index]` (None without a pool), the rows' embeddings, cond."""
        chosen = [plain[i] for i in index]
        embeds = torch.cat([row.embeds for row in chosen]).to(device)
        cond = _added_cond(pipe, chosen, resolution, device)
        if pool is None:
            return None, embeds, cond
        clean = pool[index].to(device, unet.dtype)
        noise = torch.randn(clean.shape, generator=gen).to(device, unet.dtype)
        return noise_scheduler.add_noise(clean, noise, timesteps), embeds, cond

    def live(chosen: list[_Row]) -> tuple[torch.Tensor, dict | None, list[_Row]]:
        """The rows' text states as the model in training computes them: re-encoded (with a
        graph) when the token rows train, else as encoded once. (embeds, cond, rows)."""
        if config.train == "tokens":
            chosen = [_Row(r.concept, *encode_prompt(pipe, r.prompt), r.positions, r.prompt)
                      for r in chosen]
        embeds = torch.cat([row.embeds for row in chosen]).to(device)
        return embeds, _added_cond(pipe, chosen, resolution, device), chosen

    def matched(x, timesteps, hidden, cond, target: torch.Tensor) -> torch.Tensor:
        """MSE of the trained prediction to `target`, with the probes off (not re-steered)."""
        probes.deactivate()
        pred = predict(x, timesteps, hidden, cond)
        return F.mse_loss(pred.float(), target.float())

    probes: ProbeSet | None = None
    losses: list[float] = []
    preserve_losses: list[float] = []
    hold_losses: list[float] = []
    anchor_losses: list[float] = []
    concept_anchor_losses: list[float] = []
    text_keep_losses: list[float] = []
    held_patch_losses: list[float] = []
    started = time.perf_counter()
    try:
        params = trainer.setup()
        text_keep = (
            _TextKeep(unet, keep, trainer.adapter)
            if config.text_keep_weight > 0 and keep and trainer.adapter
            else None
        )
        if text_keep is not None and not text_keep.layers:
            text_keep = None  # no LoRA on to_k / to_v: nothing text-side to keep
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        probes = install_probes(unet)
        bar = tqdm(range(config.steps), desc="re-steering", disable=not progress)
        for step in bar:
            index = [(step * config.batch_size + r) % len(rows) for r in range(config.batch_size)]
            batch = [rows[i] for i in index]
            drawn = [references.sample(row.concept, gen) for row in batch]
            latents = torch.cat([latent for latent, _ in drawn])
            latents = latents.to(device, unet.dtype)  # (B, C, h, w)
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            t = torch.randint(0, n_train_t, (len(batch),), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            embeds = torch.cat([row.embeds for row in batch]).to(device)  # (B, T, D)
            mask = TokenMask.from_positions([row.positions for row in batch], embeds.shape[1])
            if keep:
                # The base model's prediction first, before the trained forward builds its graph.
                # Each of the step's preserve prompts sees every noisy latent of the batch.
                first = step * config.preserve_batch
                keep_index = [
                    (first + j) % len(keep) for j in range(config.preserve_batch) for _ in batch
                ]
                keep_t = t.repeat(config.preserve_batch)
                if keep_latents is not None and config.preserve_t_min:
                    low = min(config.preserve_t_min, n_train_t - 1)
                    keep_t = torch.randint(low, n_train_t, keep_t.shape, generator=gen).to(device)
                keep_noisy, keep_embeds, keep_cond = noised(keep, keep_index, keep_latents, keep_t)
                if keep_latents is None:
                    keep_noisy = noisy.repeat(config.preserve_batch, 1, 1, 1)
                base = predict(keep_noisy, keep_t, keep_embeds, keep_cond, base=True)

            cond = _added_cond(pipe, batch, resolution, device)
            pixel_weights = _pixel_weights(drawn, resolution)
            hold_base = None
            if pixel_weights is not None and config.transparent_weight > 0:
                # Transparent reference pixels are held to the base model's prediction.
                hold_base = predict(noisy, t, embeds, cond, base=True)

            if anchors:
                # The anchor's base prediction on an anchor image, before the graph is built.
                anchor_index = [(step * len(batch) + r) % len(anchors) for r in range(len(batch))]
                anchor_noisy, anchor_embeds, anchor_cond = noised(
                    anchors, anchor_index, anchor_latents, t
                )
                anchor_base = predict(anchor_noisy, t, anchor_embeds, anchor_cond, base=True)

            if holds:
                # An earlier patch's concept, as the model with the earlier patches draws it.
                held_index = [(step * len(batch) + r) % len(holds) for r in range(len(batch))]
                held_noisy, held_embeds, held_cond = noised(holds, held_index, hold_latents, t)
                held_base = predict(held_noisy, t, held_embeds, held_cond, base=True,
                                    original=False)

            to_pull = [r for r, i in enumerate(index) if i in pair_of]
            if to_pull:
                # Each anchored row's anchor prompt, on its own image, by the base model.
                pull_t = t[to_pull]
                # Each pass over the rows takes the next image of every anchor prompt.
                shift = len(paired) * ((step * config.batch_size // len(rows))
                                       % config.concept_anchor_images)
                pull_noisy, pull_embeds, pull_cond = noised(
                    pair_rows, [shift + pair_of[index[r]] for r in to_pull], pair_latents, pull_t
                )
                pull_base = predict(pull_noisy, pull_t, pull_embeds, pull_cond, base=True)

            embeds, cond, trained_rows = live(batch)
            probes.activate(mask)
            own = predict(noisy, t, embeds, cond)
            loss = probes.loss(pixel_weights)
            if anchors:
                pulled = matched(anchor_noisy, t, embeds, cond, anchor_base)
                anchor_losses.append(pulled.item())
                loss = loss + config.anchor_weight * pulled
            if to_pull:
                rows_cond = _added_cond(pipe, [trained_rows[r] for r in to_pull], resolution,
                                        device)
                pulled = matched(pull_noisy, pull_t, embeds[to_pull], rows_cond, pull_base)
                concept_anchor_losses.append(pulled.item())
                loss = loss + config.concept_anchor_weight * pulled
            if hold_base is not None:
                held = _held_error(own, hold_base, pixel_weights)
                hold_losses.append(held.item())
                loss = loss + config.transparent_weight * held
            if keep:
                keep_embeds, keep_cond, _ = live([keep[i] for i in keep_index])
                preserve = matched(keep_noisy, keep_t, keep_embeds, keep_cond, base)
                preserve_losses.append(preserve.item())
                loss = loss + config.preserve_weight * preserve
            if holds:
                held_embeds, held_cond, _ = live([holds[i] for i in held_index])
                kept = matched(held_noisy, t, held_embeds, held_cond, held_base)
                held_patch_losses.append(kept.item())
                loss = loss + config.hold_weight * kept
            if text_keep is not None:
                kept_text = text_keep.penalty()
                text_keep_losses.append(kept_text.item())
                loss = loss + config.text_keep_weight * kept_text
            if not torch.isfinite(loss):
                raise FmnError(
                    f"the re-steering loss became {loss.item()} at step {step + 1}: lower the "
                    "learning rate (--lr) or train in float32; nothing was written"
                )
            loss.backward()
            probes.deactivate()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        kind, tensors, lora_config = trainer.result()
    finally:
        if probes is not None:
            probes.remove()
        trainer.restore()

    metadata = {
        "method": "forget-me-not/attention-resteering",
        "concepts": [c.to_dict() for c in concepts],
        "family": family,
        "base_model_hash": base_hash,
        "train": config.train,
        "steps": config.steps,
        "seed": config.seed,
        "settings": asdict(config),
        "versions": library_versions(),
        "losses": losses,
        **({"preserve_losses": preserve_losses} if keep else {}),
        **({"transparent_losses": hold_losses} if hold_losses else {}),
        **({"anchor_losses": anchor_losses} if anchor_losses else {}),
        **({"concept_anchor_losses": concept_anchor_losses} if concept_anchor_losses else {}),
        **({"text_keep_losses": text_keep_losses} if text_keep_losses else {}),
        **({"held_patch_losses": held_patch_losses} if held_patch_losses else {}),
        "seconds": round(time.perf_counter() - started, 3),
    }
    # Adapter name: readable, and unique per run so patches stack under their own names.
    words = "_".join("".join(ch if ch.isalnum() else "_" for ch in c.words) for c in concepts)
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True, default=str).encode())
    name = f"fmn_{words[:48]}_{digest.hexdigest()[:8]}"
    return Patch(kind=kind, tensors=tensors, metadata=metadata, lora_config=lora_config, name=name)


def _resteer_both(
    pipe: Any, family: str, concepts: Sequence[Concept], config: ResteerConfig, progress: bool
) -> Patch:
    """`train="lora+tokens"`: the LoRA, kept at `lora_strength`, and the token rows, each
    trained on the base model; one patch holds both.

    The explicit settings (lr, steps, rank, decay) are the LoRA's; the rows take their own
    family defaults. Why both (BENCHMARKS.md, "The LoRA and the token rows together"): the
    rows alone leave the concept in the UNet for any other embedding of it; the LoRA alone
    erases only as far as the other concepts allow. The rows are not trained with the LoRA
    applied: it has already lowered their attention, so they moved less and the star stayed
    (88% drawn, against 0% for rows trained on the base model).
    """
    if any(c.token_words for c in concepts):
        raise FmnError("--train lora+tokens changes the rows of words the tokenizer knows; for "
                       "tokens learnt by `fmn invert` use --train lora")
    strength = config.resolved(family).lora_strength
    trained = resteer(pipe, concepts, replace(config, train="lora"), progress=progress)
    unet_half = trained.scaled(strength) if strength != 1.0 else trained
    rows_config = replace(config, train="tokens", lr=None, steps=None, lora_rank=None,
                          lora_alpha=None, weight_decay=None)
    rows = resteer(pipe, concepts, rows_config, progress=progress)
    meta = unet_half.metadata
    metadata = {
        **meta,
        "train": HYBRID,
        "lora_strength": strength,
        "token_settings": rows.metadata["settings"],
        "token_losses": rows.metadata["losses"],
        "seconds": round(meta["seconds"] + rows.metadata["seconds"], 3),
    }
    metadata.pop("strength", None)  # the LoRA's share is recorded as lora_strength
    return Patch("lora", {**unet_half.tensors, **rows.tensors}, metadata,
                 unet_half.lora_config, trained.name)


# -- prompts ------------------------------------------------------------------------------------


def encode_prompt(pipe: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own prompt encoding, without guidance: (states (1,T,D), pooled or None)."""
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is not None:
        out = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return out[0], out[2]
    out = pipe.encode_prompt(prompt, device, 1, False)
    return out[0], None


def _encode_rows(pipe: Any, concepts: Sequence[Concept], config: ResteerConfig) -> list[_Row]:
    rows = []
    for ci, concept in enumerate(concepts):
        for prompt in concept.prompts():
            positions = merge_positions(
                locate_in_pipeline(
                    pipe, prompt, concept.words, config.include_eot, config.include_padding
                )
            )
            with torch.no_grad():
                embeds, pooled = encode_prompt(pipe, prompt)
            rows.append(_Row(ci, embeds.detach(), None if pooled is None else pooled.detach(),
                             positions, prompt))
    return rows


def _encode_preserve(pipe: Any, config: ResteerConfig) -> list[_Row]:
    """The retention regulariser's prompts, encoded once (none when it is off)."""
    if config.preserve_weight <= 0:
        return []
    return _encode_plain(pipe, config.preserve_prompts)


def _encode_plain(pipe: Any, prompts: Sequence[str]) -> list[_Row]:
    """Prompts encoded without concept positions (regulariser and anchor rows)."""
    rows = []
    for prompt in prompts:
        with torch.no_grad():
            embeds, pooled = encode_prompt(pipe, prompt)
        rows.append(
            _Row(-1, embeds.detach(), None if pooled is None else pooled.detach(), [], prompt)
        )
    return rows


def _preserve_latents(pipe: Any, config: ResteerConfig) -> torch.Tensor | None:
    """("own") one latent per preserve prompt, drawn by the base model before training."""
    if config.preserve_latents != "own":
        return None
    return _draw_latents(pipe, config.preserve_prompts, config.preserve_steps, config.seed)


def _concept_anchor_prompts(concepts: Sequence[Concept]) -> list[str | None]:
    """Per row of `_encode_rows` (same order): the concept's anchor prompt, or None."""
    out: list[str | None] = []
    for concept in concepts:
        out += concept.anchor_prompts() or [None] * len(concept.prompts())
    return out


def _encode_anchors(pipe: Any, config: ResteerConfig) -> list[_Row]:
    """The anchor term's prompts, encoded once (none when it is off)."""
    if config.anchor_weight <= 0:
        return []
    return _encode_plain(pipe, config.anchor_prompts)


def _draw_latents(pipe: Any, prompts: Sequence[str], steps: int, seed: int) -> torch.Tensor:
    """One latent per prompt (N, C, h, w), drawn by the model as it is now; seeded.

    Already scaled latents; a generator per image keeps each image's noise its own.
    """
    out = []
    for i in range(0, len(prompts), 16):  # bounded batches: real models draw 512+ px images
        chunk = list(prompts[i : i + 16])
        gens = [torch.Generator("cpu").manual_seed(seed * 10_007 + i + j)
                for j in range(len(chunk))]
        with torch.no_grad():
            result = pipe(chunk, num_inference_steps=steps, generator=gens, output_type="latent")
        out.append(result.images.detach().to("cpu", torch.float32))
    return torch.cat(out)


def _added_cond(
    pipe: Any, batch: Sequence[_Row], resolution: int, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """SDXL's extra conditioning: pooled text embedding + (size, crop, target size) ids."""
    if batch[0].pooled is None:
        return None
    text_embeds = torch.cat([row.pooled for row in batch]).to(device)  # (B, P)
    # Same ids the pipeline uses at inference for a full, uncropped image at its native size.
    ids = [resolution, resolution, 0, 0, resolution, resolution]
    time_ids = torch.tensor([ids] * len(batch), dtype=text_embeds.dtype, device=device)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


# -- reference latents -------------------------------------------------------------------------


class _References:
    """Where each step's clean latent comes from, per concept."""

    def __init__(
        self,
        pipe: Any,
        resolution: int,
        images: dict[int, list[Any]],
        latents: dict[int, torch.Tensor],
    ) -> None:
        self.pipe = pipe
        self.resolution = resolution
        self.images = images  # concept -> PIL images ("images")
        self.latents = latents  # concept -> (N, C, h, w) ("self", "noise")

    def sample(
        self, concept: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One clean latent (1, C, h, w) for `concept`, and its pixel weights (1, 1, H, W).

        The weights come from a reference image's alpha channel (None: every pixel counts).
        """
        if concept in self.latents:
            pool = self.latents[concept]
            i = int(torch.randint(0, pool.shape[0], (1,), generator=gen))
            return pool[i : i + 1], None
        pool = self.images[concept]
        i = int(torch.randint(0, len(pool), (1,), generator=gen))
        pixels = resize_random_crop(pool[i], self.resolution, gen)[None]  # (1, 3 or 4, H, W)
        weights = (pixels[:, 3:] + 1.0) / 2.0 if pixels.shape[1] == 4 else None
        return encode_images(self.pipe, pixels[:, :3], gen), weights


def _pixel_weights(
    drawn: Sequence[tuple[torch.Tensor, torch.Tensor | None]], resolution: int
) -> torch.Tensor | None:
    """The batch's pixel weights (B, 1, H, W), or None when no reference carries a mask."""
    if all(weights is None for _, weights in drawn):
        return None
    ones = torch.ones(1, 1, resolution, resolution)
    return torch.cat([ones if weights is None else weights for _, weights in drawn])


def _held_error(
    prediction: torch.Tensor, base: torch.Tensor, pixel_weights: torch.Tensor
) -> torch.Tensor:
    """Mean squared change of the prediction over the transparent pixels (latent grid)."""
    outside = 1.0 - F.interpolate(pixel_weights, size=prediction.shape[-2:], mode="area")
    outside = outside.to(prediction.device, torch.float32)  # (B, 1, h, w)
    squared = (prediction.float() - base.float()) ** 2 * outside
    return squared.sum() / (outside.sum() * prediction.shape[1]).clamp_min(1e-8)


def encode_images(pipe: Any, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """VAE-encode (B, 3, H, W) pixels in [-1, 1] into scaled latents (B, C, h, w)."""
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
        latents = dist.mean + dist.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _references(
    pipe: Any,
    concepts: Sequence[Concept],
    config: ResteerConfig,
    resolution: int,
    gen: torch.Generator,
) -> _References:
    images: dict[int, list[Any]] = {}
    latents: dict[int, torch.Tensor] = {}
    channels = pipe.unet.config.in_channels
    side = resolution // int(getattr(pipe, "vae_scale_factor", 8))
    for ci, concept in enumerate(concepts):
        if config.reference == "noise":
            # "No real image": the clean latent is zero, so the UNet sees pure noise.
            latents[ci] = torch.zeros(1, channels, side, side)
        elif config.reference == "self":
            latents[ci] = _self_generate(pipe, concept, config)
        else:
            if not concept.images:
                raise FmnError(
                    f"concept {concept.name!r} has no reference images: pass an image folder, "
                    "or let the model draw them (--self-generate N) or use --no-real-image"
                )
            images[ci] = load_images(concept.images, min_size=resolution, keep_alpha=True)
    return _References(pipe, resolution, images, latents)


def _self_generate(pipe: Any, concept: Concept, config: ResteerConfig) -> torch.Tensor:
    """Latents (N, C, h, w) the model itself draws from the concept's prompts (no images)."""
    prompts = concept.prompts()
    chosen = [prompts[i % len(prompts)] for i in range(config.n_self_images)]
    return _draw_latents(pipe, chosen, config.self_steps, config.seed)


# -- text-side retention ------------------------------------------------------------------------


class _TextKeep:
    """The LoRA's effect on the preserve prompts' text states, for every to_k / to_v layer."""

    def __init__(self, unet: torch.nn.Module, keep: list[_Row], adapter: str) -> None:
        states = torch.cat([row.embeds.reshape(-1, row.embeds.shape[-1]) for row in keep])
        second = states.float().T @ states.float() / states.shape[0]  # (D, D)
        values, vectors = torch.linalg.eigh(second)
        self.root = vectors * values.clamp(min=0).sqrt()  # L with L L^T = second moment
        self.layers = []
        for name, module in unet.named_modules():
            if not name.endswith(("attn2.to_k", "attn2.to_v")):
                continue
            lora_a, lora_b = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
            if adapter not in lora_a:
                continue
            base = module.base_layer.weight.detach().float()
            root = self.root.to(base.device)
            norm = float((base @ root).pow(2).sum()) or 1.0
            self.layers.append((lora_a[adapter].weight, lora_b[adapter].weight,
                                module.scaling[adapter], root, norm))

    def penalty(self) -> torch.Tensor:
        terms = [(scale * (b.float() @ (a.float() @ root))).pow(2).sum() / norm  # (out, D)
                 for a, b, scale, root, norm in self.layers]
        return torch.stack(terms).mean()


# -- what trains ---------------------------------------------------------------------------------


class _Trainable:
    """Sets up the trainable tensors, reads out the result, and puts the UNet back."""

    def __init__(self, unet: torch.nn.Module, config: ResteerConfig, *, pipe: Any = None,
                 words: Sequence[str] = ()) -> None:
        self.pipe, self.words = pipe, list(words)  # the text encoders' owner, for "tokens"
        self.rows: Any = None  # token_rows.RowDeltas with train="tokens"
        self.unet = unet
        self.config = config
        self.originals: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.adapter: str | None = None
        self.active_before: list[str] = []
        self.was_training = unet.training

    def setup(self) -> list[torch.nn.Parameter]:
        cfg, unet = self.config, self.unet
        if cfg.train == "tokens":
            return self._add_rows()
        if cfg.train == "lora":
            self._add_lora()
        else:
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    continue  # adapters of applied patches are not ours to train
                if cfg.train == "unet" or ".attn2." in f".{name}":
                    self.params[name] = p
            low = [n for n, p in self.params.items() if p.dtype != torch.float32]
            if low:
                raise FmnError(
                    f"--train {cfg.train} updates full weights, which must be float32 (found "
                    f"{self.params[low[0]].dtype}): load the model with --dtype float32, or "
                    "train a LoRA patch"
                )
            for name, p in self.params.items():
                self.originals[name] = p.detach().to("cpu", copy=True)
        for p in self.params.values():
            p.requires_grad_(True)
        if not self.params:
            raise FmnError("nothing to train: the UNet has no cross-attention weights")
        return list(self.params.values())

    def _add_rows(self) -> list[torch.Tensor]:
        from forget_me_not.token_rows import RowDeltas, word_token_ids

        per_word = [word_token_ids(self.pipe, w) for w in self.words]
        ids = [list(dict.fromkeys(i for word in per_word for i in word[e]))
               for e in range(len(per_word[0]))]
        self.rows = RowDeltas(self.pipe, ids)
        self.rows.attach()
        return list(self.rows.deltas)

    def _add_lora(self) -> None:
        from peft import LoraConfig

        cfg, unet = self.config, self.unet
        if getattr(unet, "_hf_peft_config_loaded", False):
            self.active_before = list(unet.active_adapters())
        self.adapter = TRAIN_ADAPTER
        lora = LoraConfig(**self.lora_config())
        # peft draws lora_A from the global RNG: seed it so runs repeat, without disturbing
        # the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet.add_adapter(lora, adapter_name=self.adapter)
        if self.active_before:
            unet.set_adapters([*self.active_before, self.adapter])
        for name, p in unet.named_parameters():
            mine = "lora_" in name and f".{self.adapter}." in f"{name}."
            p.requires_grad_(False)
            if mine:
                if p.dtype != torch.float32:
                    p.data = p.data.float()  # optimiser state and updates in float32
                self.params[name] = p

    @contextlib.contextmanager
    def base_weights(self, original: bool = True) -> Iterator[None]:
        """Within: the UNet computes as the base model (the trained delta switched off).

        `original`: the patches named in `compare_without` are switched off as well.
        """
        if self.rows is not None:
            yield  # the UNet is untouched; base predictions take the rows' base encodings
            return
        if self.adapter is not None:
            # peft adds scaling[adapter] * B(A(x)); a zero scaling gives exactly the base output.
            names = [self.adapter, *(self.config.compare_without if original else ())]
            switched = [
                (m, name)
                for m in self.unet.modules()
                if isinstance(getattr(m, "scaling", None), dict)
                for name in names
                if name in m.scaling
            ]
            saved = [m.scaling[name] for m, name in switched]
            for m, name in switched:
                m.scaling[name] = 0.0
            try:
                yield
            finally:
                for (m, name), value in zip(switched, saved, strict=True):
                    m.scaling[name] = value
            return
        with torch.no_grad():
            trained = {n: p.detach().clone() for n, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.originals[name].to(p.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(trained[name])

    def lora_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
            "target_modules": [f"attn2.{t}" for t in cfg.lora_targets],
            "init_lora_weights": True,
        }

    def result(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any] | None]:
        if self.rows is not None:
            return "embedding", self.rows.tensors(), None
        if self.config.train == "lora":
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet, adapter_name=self.adapter)
            tensors = {
                f"unet.{k}": v.detach().to("cpu", torch.float32).clone() for k, v in state.items()
            }
            return "lora", tensors, self.lora_config()
        tensors = {}
        for name, p in self.params.items():
            delta = p.detach().to("cpu", torch.float32) - self.originals[name].float()
            if torch.count_nonzero(delta):
                tensors["unet." + name.replace(".base_layer.", ".")] = delta
        return "delta", tensors, None

    def restore(self) -> None:
        if self.rows is not None:
            self.rows.detach()
        unet = self.unet
        for p in unet.parameters():
            p.requires_grad_(False)
            p.grad = None
        if self.adapter is not None:
            unet.delete_adapters(self.adapter)
            self.adapter = None
            if not getattr(unet, "peft_config", None):
                from diffusers.utils import recurse_remove_peft_layers

                recurse_remove_peft_layers(unet)
                unet._hf_peft_config_loaded = None
            elif self.active_before:
                _reactivate(unet, self.active_before)
        with torch.no_grad():
            for name, original in self.originals.items():
                self.params[name].copy_(original.to(self.params[name].device))
        self.originals.clear()
        unet.train(self.was_training)


def _reactivate(unet: Any, names: list[str]) -> None:
    from forget_me_not.patch import _registry

    registry = _registry(unet)
    unet.set_adapters(names, [registry.get(n, {}).get("scale", 1.0) for n in names])


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "no":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        yield
