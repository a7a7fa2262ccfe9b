"""The terms FMN's objective may add to the attention loss, each a small object.

A term prepares what it needs once (encoded prompts, images the base model draws), computes its
base-model targets in `before` (ahead of the trained forward, so no graph is kept for them), and
returns its loss in `loss`. The loop sums `weight * loss` over the terms present and logs each
by name. `draws_at` orders the `before` calls: it fixes the order of the random draws, so a
recipe and seed give the same patch they were measured with.
"""

from __future__ import annotations

from typing import Any

import torch

from forget_me_not.concepts import Concept
from forget_me_not.methods.fmn.references import held_error
from forget_me_not.pipeline_io import Row, draw_latents, encode_plain


class Term:
    """One named part of the objective; subclasses set `name` and `draws_at`."""

    name = "term"
    draws_at = 0

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def before(self, run: Any, step: Any) -> None:
        """Base-model targets for this step (random draws happen here)."""

    def loss(self, run: Any, step: Any) -> torch.Tensor | None:
        """This step's loss, or None when the term does not apply to the step."""
        raise NotImplementedError


class Preserve(Term):
    """Retention: the preserve prompts' prediction held to the base model's."""

    name, draws_at = "preserve", 0

    def __init__(self, run: Any, prompts: tuple[str, ...]) -> None:
        cfg = run.config
        super().__init__(cfg.preserve_weight)
        self.rows = encode_plain(run.pipe, prompts)
        self.empty = encode_plain(run.pipe, [""])[0]
        # "own": one image the base model draws per prompt, compared at its own timesteps.
        self.latents = (draw_latents(run.pipe, prompts, cfg.preserve_steps, cfg.seed)
                        if cfg.preserve_latents == "own" else None)

    def before(self, run: Any, step: Any) -> None:
        cfg = run.config
        # Each of the step's preserve prompts sees every noisy latent of the batch.
        first = step.number * cfg.preserve_batch
        self.index = [(first + j) % len(self.rows)
                      for j in range(cfg.preserve_batch) for _ in step.batch]
        self.t = step.t.repeat(cfg.preserve_batch)
        if self.latents is not None and cfg.preserve_t_min:
            low = min(cfg.preserve_t_min, run.n_train_t - 1)
            self.t = torch.randint(low, run.n_train_t, self.t.shape,
                                   generator=run.gen).to(run.device)
        self.noisy, embeds, cond = run.noised(self.rows, self.index, self.latents, self.t)
        if self.latents is None:
            self.noisy = step.noisy.repeat(cfg.preserve_batch, 1, 1, 1)
        self.base = run.predict(self.noisy, self.t, embeds, cond, base=True)
        if cfg.preserve_guidance > 0:
            # The base model's empty prompt, as encoded once (not the model in training's).
            _, embeds, cond = run.noised([self.empty], [0] * len(self.index), None, self.t)
            self.base = guided(run.predict(self.noisy, self.t, embeds, cond, base=True),
                               self.base, cfg.preserve_guidance)

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        embeds, cond = run.live([self.rows[i] for i in self.index])
        scale = run.config.preserve_guidance
        if scale <= 0:
            return run.matched(self.noisy, self.t, embeds, cond, self.base)
        run.probes.deactivate()
        prompted = run.predict(self.noisy, self.t, embeds, cond)
        unprompted = run.predict(self.noisy, self.t, *run.live([self.empty] * len(self.index)))
        return torch.nn.functional.mse_loss(guided(unprompted, prompted, scale).float(),
                                            self.base.float())


def guided(unprompted: torch.Tensor, prompted: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: what a sampling step at `scale` uses."""
    return unprompted + scale * (prompted - unprompted)


class Transparent(Term):
    """References with transparency: the prediction on transparent pixels held to the base."""

    name, draws_at = "transparent", 1

    def before(self, run: Any, step: Any) -> None:
        self.base = None
        if step.pixel_weights is not None:
            self.base = run.predict(step.noisy, step.t, step.embeds, step.cond, base=True)

    def loss(self, run: Any, step: Any) -> torch.Tensor | None:
        if self.base is None:
            return None
        return held_error(step.own, self.base, step.pixel_weights)


class Anchor(Term):
    """The concept's prediction pulled toward the base's for anchor prompts, on their images."""

    name, draws_at = "anchor", 2

    def __init__(self, run: Any) -> None:
        cfg = run.config
        super().__init__(cfg.anchor_weight)
        self.rows = encode_plain(run.pipe, cfg.anchor_prompts)
        self.latents = draw_latents(run.pipe, cfg.anchor_prompts, cfg.preserve_steps,
                                    cfg.seed + 1)

    def before(self, run: Any, step: Any) -> None:
        index = [(step.number * len(step.batch) + r) % len(self.rows)
                 for r in range(len(step.batch))]
        self.noisy, embeds, cond = run.noised(self.rows, index, self.latents, step.t)
        self.base = run.predict(self.noisy, step.t, embeds, cond, base=True)

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        return run.matched(self.noisy, step.t, step.live_embeds, step.live_cond, self.base)


class Erase(Term):
    """ESD's target inside FMN's loop: the concept's images, through the batch's prompts (its
    words and the adversary's tokens), predicted as the base model predicts them from a neutral
    prompt, minus `erase_guidance` times the concept's pull. Re-steering attention removes where
    the word is read; this removes what the UNet draws from whatever conditioning asks for it.

    The neutral prompt is the empty one (`erase_neutral` 'empty', as ESD), or the same prompt
    with the concept's words taken out or put as its anchor ('prompt'): then "a red circle in
    outlined style" is pulled to "a red circle in solid style", not to no circle at all."""

    name, draws_at = "erase", 4

    def __init__(self, run: Any, concepts: list[Concept]) -> None:
        cfg = run.config
        super().__init__(cfg.erase_weight)
        self.guidance = cfg.erase_guidance
        self.empty = encode_plain(run.pipe, [""])[0]
        self.neutral: dict[str, Row] = {}
        if cfg.erase_neutral == "prompt":
            for concept in concepts:
                self.neutral.update(zip(concept.prompts(),
                                        encode_plain(run.pipe, concept.neutral_prompts()),
                                        strict=True))

    def before(self, run: Any, step: Any) -> None:
        # A row with no neutral of its own (the adversary's tokens) takes the empty prompt.
        rows = [self.neutral.get(row.prompt, self.empty) for row in step.batch]
        embeds = torch.cat([row.embeds for row in rows]).to(run.device)
        uncond = run.predict(step.noisy, step.t, embeds, run.cond(rows), base=True)
        self.target = uncond
        if self.guidance > 0:
            asked = run.predict(step.noisy, step.t, step.embeds, step.cond, base=True)
            self.target = uncond - self.guidance * (asked - uncond)

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(step.own.float(), self.target.float())


class Hold(Term):
    """Training on top of patches: their concepts held to what the patched model draws."""

    name, draws_at = "hold", 3

    def __init__(self, run: Any) -> None:
        cfg = run.config
        super().__init__(cfg.hold_weight)
        self.rows = encode_plain(run.pipe, cfg.hold_prompts)
        self.latents = draw_latents(run.pipe, cfg.hold_prompts, cfg.preserve_steps, cfg.seed + 3)

    def before(self, run: Any, step: Any) -> None:
        self.index = [(step.number * len(step.batch) + r) % len(self.rows)
                      for r in range(len(step.batch))]
        self.noisy, embeds, cond = run.noised(self.rows, self.index, self.latents, step.t)
        self.base = run.predict(self.noisy, step.t, embeds, cond, base=True, original=False)

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        embeds, cond = run.live([self.rows[i] for i in self.index])
        return run.matched(self.noisy, step.t, embeds, cond, self.base)


class ConceptAnchor(Term):
    """Concepts that name an anchor: each prompt pulled toward the same prompt with the anchor
    words, on images the base model draws for that anchor prompt."""

    name, draws_at = "concept_anchor", 4

    def __init__(self, run: Any, concepts: list[Concept]) -> None:
        cfg = run.config
        super().__init__(cfg.concept_anchor_weight)
        per_row: list[str | None] = []  # same order as the concept rows
        for concept in concepts:
            per_row += concept.anchor_prompts() or [None] * len(concept.prompts())
        self.paired = [i for i, prompt in enumerate(per_row) if prompt is not None]
        self.pair_of = {row: k for k, row in enumerate(self.paired)}
        prompts = [per_row[i] for i in self.paired]
        # Latent k * len(paired) + j is the k-th image of anchor prompt j; the rows repeat alike.
        self.rows = encode_plain(run.pipe, prompts) * cfg.concept_anchor_images
        self.latents = (draw_latents(run.pipe, prompts * cfg.concept_anchor_images,
                                     cfg.preserve_steps, cfg.seed + 2) if self.paired else None)
        self.n_rows = len(per_row)

    def before(self, run: Any, step: Any) -> None:
        cfg = run.config
        self.to_pull = [r for r, i in enumerate(step.index) if i in self.pair_of]
        if not self.to_pull:
            return
        self.t = step.t[self.to_pull]
        # Each pass over the rows takes the next image of every anchor prompt.
        shift = len(self.paired) * ((step.number * cfg.batch_size // self.n_rows)
                                    % cfg.concept_anchor_images)
        chosen = [shift + self.pair_of[step.index[r]] for r in self.to_pull]
        self.noisy, embeds, cond = run.noised(self.rows, chosen, self.latents, self.t)
        self.base = run.predict(self.noisy, self.t, embeds, cond, base=True)

    def loss(self, run: Any, step: Any) -> torch.Tensor | None:
        if not self.to_pull:
            return None
        cond = run.cond([step.live_rows[r] for r in self.to_pull])
        return run.matched(self.noisy, self.t, step.live_embeds[self.to_pull], cond, self.base)


class TextKeep(Term):
    """What the LoRA on to_k / to_v does to the preserve prompts' text states, relative to the
    base weights: mean over layers of ||B A L||^2 / ||W L||^2, with L L^T their second moment.
    A direction the other prompts use costs; one only the target's prompts use is free."""

    name, draws_at = "text_keep", 5

    def __init__(self, weight: float, unet: torch.nn.Module, keep: list[Row],
                 adapter: str) -> None:
        super().__init__(weight)
        states = torch.cat([row.embeds.reshape(-1, row.embeds.shape[-1]) for row in keep])
        second = states.float().T @ states.float() / states.shape[0]  # (D, D)
        values, vectors = torch.linalg.eigh(second)
        root = vectors * values.clamp(min=0).sqrt()  # L with L L^T = second moment
        self.layers = []
        for name, module in unet.named_modules():
            if not name.endswith(("attn2.to_k", "attn2.to_v")):
                continue
            lora_a, lora_b = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
            if adapter not in lora_a:
                continue
            base = module.base_layer.weight.detach().float()
            local = root.to(base.device)
            norm = float((base @ local).pow(2).sum()) or 1.0
            self.layers.append((lora_a[adapter].weight, lora_b[adapter].weight,
                                module.scaling[adapter], local, norm))

    def loss(self, run: Any, step: Any) -> torch.Tensor:
        terms = [(scale * (b.float() @ (a.float() @ root))).pow(2).sum() / norm  # (out, D)
                 for a, b, scale, root, norm in self.layers]
        return torch.stack(terms).mean()
