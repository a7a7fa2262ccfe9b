"""Move a word's meaning by training only its token embedding: correction by the role's tokens.

A role word that collapses onto one identity ("wizard" always drawn as milka) can be corrected
without touching the UNet: the rows of the token-embedding table that spell the role are the
only trainable tensors, and the role's noise prediction is pulled toward the base model's
prediction for anchor prompts that show the role on other people ("zorbo wearing a hat"), on
images the base model draws for those anchors. Every prompt without the role's tokens keeps
exactly the base model's output, so the identity named directly is untouched by construction.

Measured on ConceptWorld's wizard -> milka (BENCHMARKS.md, "Correction"): the LoRA re-steering
correction could not move the role without costing milka; this one moves it and keeps milka.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from forget_me_not.concepts import Concept, pipeline_tokenizers
from forget_me_not.data import model_resolution
from forget_me_not.errors import FmnError
from forget_me_not.methods.token_rows.rows import RowDeltas, word_token_ids
from forget_me_not.patch import Patch, family_of, library_versions, model_hash
from forget_me_not.pipeline_io import Row, added_cond, draw_latents, encode_prompt, freeze
from forget_me_not.progress import Progress

# Defaults measured on ConceptWorld's wizard -> milka (BENCHMARKS.md, "Correction").
DEFAULT_STEPS = 150
DEFAULT_LR = 5e-3


@dataclass(frozen=True)
class TokenPullConfig:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    seed: int = 0
    anchor_steps: int = 25  # denoising steps of the anchor images the base model draws
    anchor_images: int = 1  # images drawn per anchor prompt

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FmnError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise FmnError(f"the learning rate must be positive, got {self.lr}")
        if self.anchor_steps < 1 or self.anchor_images < 1:
            raise FmnError("anchor_steps and anchor_images must be at least 1")


def pull_tokens(
    pipe: Any,
    role: Concept,
    anchors: Sequence[str],
    config: TokenPullConfig | None = None,
    *,
    progress: bool = True,
) -> Patch:
    """Train the role's token rows so its prompts predict what the `anchors` predict.

    Returns an "embedding" patch; the pipeline is left as it was. On a non-finite loss or an
    interruption nothing is returned and the pipeline is unchanged.
    """
    config = config or TokenPullConfig()
    anchors = list(dict.fromkeys(anchors))
    if not anchors:
        raise FmnError(
            "the token pull needs prompts that show the role on someone else: pass --toward "
            "PROMPT (e.g. 'a woman warrior in armour')"
        )
    clash = [a for a in anchors if role.words.lower() in a.lower()]
    if clash:
        raise FmnError(f"anchor prompt {clash[0]!r} contains the role {role.words!r}: anchors "
                       "must show the role's look without its name")
    started = time.perf_counter()
    family, base_hash = family_of(pipe), model_hash(pipe)
    ids = word_token_ids(pipe, role.words)
    unet, device = pipe.unet, pipe.unet.device
    freeze(pipe)

    # What the role should become: the base model's own drawings of the anchors, and its
    # predictions for them (computed per step on the same noisy latent).
    anchor_prompts = anchors * config.anchor_images
    latents = draw_latents(pipe, anchor_prompts, config.anchor_steps, config.seed)
    with torch.no_grad():
        anchor_rows = [_row(pipe, p) for p in anchor_prompts]
    role_prompts = role.prompts()
    resolution = model_resolution(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator("cpu").manual_seed(config.seed)
    rows = RowDeltas(pipe, ids)
    optimizer = torch.optim.Adam(rows.deltas, lr=config.lr)
    losses: list[float] = []
    bar = Progress(config.steps, f"correcting {role.words!r}", enabled=progress)
    with rows.active():
        for step in range(config.steps):
            j = step % len(anchor_prompts)
            clean = latents[j : j + 1].to(device, unet.dtype)
            noise = torch.randn(clean.shape, generator=gen).to(device, unet.dtype)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen)
            t = t.to(device)
            noisy = scheduler.add_noise(clean, noise, t)
            anchor = anchor_rows[j]
            with torch.no_grad():
                target = unet(noisy, t, encoder_hidden_states=anchor.embeds.to(device),
                              added_cond_kwargs=added_cond(pipe, [anchor], resolution, device),
                              return_dict=False)[0]
            row = _row(pipe, role_prompts[step % len(role_prompts)])
            pred = unet(noisy, t, encoder_hidden_states=row.embeds,
                        added_cond_kwargs=added_cond(pipe, [row], resolution, device),
                        return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float())
            if not torch.isfinite(loss):
                raise FmnError(
                    f"the correction loss became {loss.item()} at step {step + 1}: lower the "
                    "learning rate (--lr); nothing was written"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(loss=losses[-1])
    bar.close()

    tokens = [tok.convert_ids_to_tokens(list(i))
              for tok, i in zip(pipeline_tokenizers(pipe), ids, strict=True)]
    metadata = {
        "method": "correction",
        "concepts": [role.to_dict()],
        "family": family,
        "base_model_hash": base_hash,
        "train": "token-embedding",
        "steps": config.steps,
        "seed": config.seed,
        "settings": {**asdict(config), "anchor_prompts": anchors},
        "tokens": tokens,
        "versions": library_versions(),
        "losses": losses,
        "seconds": round(time.perf_counter() - started, 3),
    }
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True, default=str).encode())
    words = "".join(ch if ch.isalnum() else "_" for ch in role.words)[:48]
    return Patch("embedding", rows.tensors(), metadata, None,
                 f"fmn_tokens_{words}_{digest.hexdigest()[:8]}")


def _row(pipe: Any, prompt: str) -> Row:
    embeds, pooled = encode_prompt(pipe, prompt)
    return Row(-1, embeds, pooled, [])
