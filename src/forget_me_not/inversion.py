"""Textual inversion: learn placeholder tokens for a concept that words describe badly.

The optional first stage of Forget-Me-Not: N new tokens ("<c0>" ... "<cN-1>") are added to the
tokenizer(s), initialised from the concept's words (the rest random), and only their embeddings
are trained with the plain noise-prediction loss on the reference images. After every step the
new embeddings' norm decays toward 0.4, as in the paper's recipe. Re-steering can then target
the placeholder phrase (`Concept(token_words=...)`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from forget_me_not.concepts import pipeline_tokenizers
from forget_me_not.data import load_images, model_resolution, resize_random_crop
from forget_me_not.errors import FmnError
from forget_me_not.files import write_atomic
from forget_me_not.patch import family_of, library_versions
from forget_me_not.pipeline_io import autocast, encode_images, encode_prompt, text_encoders
from forget_me_not.progress import Progress

NORM_TARGET = 0.4  # the paper's target norm for the new embeddings
DEFAULT_TEMPLATES = ("a photo of {}",)
_KEYS = ("emb_params", "emb_params_2")  # per text encoder; "emb_params" is what diffusers reads


@dataclass
class Embedding:
    """Learnt placeholder tokens: their strings and one (N, dim) tensor per text encoder."""

    tokens: list[str]
    vectors: list[torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise FmnError("an embedding needs at least one token")
        for v in self.vectors:
            if v.ndim != 2 or v.shape[0] != len(self.tokens):
                raise FmnError(
                    f"embedding vectors must be ({len(self.tokens)}, dim), got {tuple(v.shape)}"
                )

    @property
    def phrase(self) -> str:
        """What to write in prompts: the placeholder tokens separated by spaces."""
        return " ".join(self.tokens)

    def save(self, path: str | Path) -> Path:
        """One small .safetensors: the vectors plus the token strings in the header."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise FmnError(f"embedding file {path} must end in .safetensors: rename the output")
        if not path.parent.is_dir():
            raise FmnError(f"output folder {path.parent} does not exist: create it first")
        tensors = {_KEYS[i]: v.detach().to("cpu", torch.float32).contiguous()
                   for i, v in enumerate(self.vectors)}
        header = {"format": "pt", "forget_me_not": json.dumps(
            {**self.metadata, "tokens": self.tokens}, sort_keys=True, default=str)}
        return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header),
                            "embedding")

    def load_into(self, pipe: Any) -> str:
        """Add the tokens to the pipeline's tokenizer(s) and text encoder(s); return the phrase."""
        encoders = text_encoders(pipe)
        tokenizers = pipeline_tokenizers(pipe)
        if len(encoders) != len(self.vectors):
            raise FmnError(
                f"this embedding has vectors for {len(self.vectors)} text encoder(s) but the "
                f"pipeline has {len(encoders)}: load it into the model family it was learnt on"
            )
        for enc, vec in zip(encoders, self.vectors, strict=True):
            dim = enc.get_input_embeddings().weight.shape[1]
            if vec.shape[1] != dim:
                raise FmnError(
                    f"embedding width {vec.shape[1]} does not match the text encoder's {dim}: "
                    "load it into the model it was learnt on"
                )
        for tok, enc, vec in zip(tokenizers, encoders, self.vectors, strict=True):
            ids = _add_tokens(tok, enc, self.tokens)
            with torch.no_grad():
                table = enc.get_input_embeddings().weight
                table[ids] = vec.to(table.device, table.dtype)
        return self.phrase


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding written by `Embedding.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FmnError(f"embedding file {path} does not exist: pass a .safetensors embedding")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            vectors = [f.get_tensor(k) for k in _KEYS if k in f.keys()]  # noqa: SIM118
    except Exception as e:
        raise FmnError(f"embedding file {path} is not a readable safetensors file ({e})") from e
    if "forget_me_not" not in header or not vectors:
        raise FmnError(f"{path} is not a forget-me-not embedding: make one with `fmn invert`")
    meta = json.loads(header["forget_me_not"])
    tokens = meta.pop("tokens")
    return Embedding(tokens=tokens, vectors=vectors, metadata=meta)


# -- training -----------------------------------------------------------------------------------


def _add_tokens(tokenizer: Any, encoder: torch.nn.Module, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` (all new) and grow the encoder's embedding table; return their ids."""
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise FmnError(
            f"the tokenizer already has the token(s) {existing}: load the embedding into a "
            "fresh pipeline, or learn it with another placeholder prefix"
        )
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    encoder.resize_token_embeddings(len(tokenizer))
    return ids


def placeholder_tokens(pipe: Any, num_tokens: int, prefix: str = "c") -> list[str]:
    """Fresh placeholder strings "<c0>".. that no tokenizer of `pipe` has yet."""
    vocabs = [set(t.get_vocab()) for t in pipeline_tokenizers(pipe)]
    for k in range(1000):
        stem = prefix if k == 0 else f"{prefix}{k}_"
        tokens = [f"<{stem}{i}>" for i in range(num_tokens)]
        if not any(t in v for t in tokens for v in vocabs):
            return tokens
    raise FmnError(f"no free placeholder names with prefix {prefix!r}: choose another prefix")


def _init_ids(tokenizer: Any, init_words: str | None) -> list[int]:
    if not init_words:
        return []
    ids = list(tokenizer(init_words, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FmnError(f"init words {init_words!r} give no tokens: pass ordinary words")
    return ids


def train_inversion(
    pipe: Any,
    images: str | Path | Iterable[str | Path] | Iterable[Image.Image],
    *,
    num_tokens: int = 4,
    init_words: str | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 1,
    norm_target: float = NORM_TARGET,
    mixed_precision: str = "no",
    init_sigma: float | None = None,
    weight_decay: float = 0.0,
    flip_p: float = 0.0,
    progress: bool = True,
) -> Embedding:
    """Learn `num_tokens` placeholder tokens from reference images; return the Embedding.

    Only the new embedding rows train. The pipeline keeps the new tokens afterwards (they are
    ready to prompt with); everything else is unchanged. Rows not copied from `init_words` start
    random: `randn * init_sigma` (the official recipe: sigma 1), or with None the table's own
    per-dimension mean and spread. `flip_p`: the share of steps whose image is flipped.
    """
    if num_tokens < 1 or steps < 1 or batch_size < 1:
        raise FmnError("num_tokens, steps and batch_size must each be at least 1")
    if not lr > 0:
        raise FmnError(f"learning rate must be positive, got {lr}")
    if not 0.0 <= flip_p <= 1.0 or not weight_decay >= 0:
        raise FmnError(f"flip_p must be in 0..1 and weight_decay >= 0, got {flip_p}, "
                       f"{weight_decay}")
    for t in templates:
        if t.count("{}") != 1:
            raise FmnError(f"prompt template {t!r} must contain '{{}}' exactly once")
    resolution = model_resolution(pipe)
    pil_images = load_images(images, min_size=resolution)
    gen = torch.Generator("cpu").manual_seed(seed)
    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    encoders = text_encoders(pipe)
    tokenizers = pipeline_tokenizers(pipe)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)

    # New tokens: the first rows copy the init words' embeddings, the rest are random rows
    # with the table's own per-dimension mean and spread.
    tokens = placeholder_tokens(pipe, num_tokens)
    new_ids: list[list[int]] = []
    for tok, enc in zip(tokenizers, encoders, strict=True):
        init = _init_ids(tok, init_words)
        ids = _add_tokens(tok, enc, tokens)
        table = enc.get_input_embeddings().weight
        with torch.no_grad():
            old = table[: min(ids)]
            mean, std = old.float().mean(0), old.float().std(0)
            for j, tid in enumerate(ids):
                if j < len(init):
                    table[tid] = table[init[j]]
                elif init_sigma is not None:
                    rnd = torch.randn(table.shape[1], generator=gen) * init_sigma
                    table[tid] = rnd.to(table.device, table.dtype)
                else:
                    rnd = torch.randn(table.shape[1], generator=gen) * std.cpu() + mean.cpu()
                    table[tid] = rnd.to(table.device, table.dtype)
        new_ids.append(ids)

    tables = [enc.get_input_embeddings().weight for enc in encoders]
    frozen = [t.detach().clone() for t in tables]
    for t in tables:
        t.requires_grad_(True)
    optimizer = torch.optim.AdamW(tables, lr=lr, weight_decay=weight_decay)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    phrase = " ".join(tokens)
    prompts = [t.format(phrase) for t in templates]
    # The decay step is lr-scaled as in the recipe the paper follows: lambda = min(1, 100 lr).
    decay = min(1.0, 100 * lr)
    losses: list[float] = []
    try:
        bar = Progress(steps, "inverting", enabled=progress)
        for step in range(steps):
            rows = [(step * batch_size + r) for r in range(batch_size)]
            pixels = torch.stack([_drawn(pil_images, resolution, flip_p, gen)
                                  for _ in rows])  # (B, 3, H, W)
            latents = encode_images(pipe, pixels, gen).to(device, unet.dtype)  # (B, C, h, w)
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),),
                              generator=gen).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            encoded = [encode_prompt(pipe, prompts[r % len(prompts)]) for r in rows]
            embeds = torch.cat([e for e, _ in encoded])  # (B, T, D), with grad to the new rows
            added = None
            if encoded[0][1] is not None:
                text_embeds = torch.cat([p for _, p in encoded])
                ids = [resolution, resolution, 0, 0, resolution, resolution]
                added = {"text_embeds": text_embeds,
                         "time_ids": torch.tensor([ids] * len(rows), dtype=text_embeds.dtype,
                                                  device=device)}
            with autocast(device, mixed_precision):
                pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                            return_dict=False)[0]
            if prediction == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float())
            if not torch.isfinite(loss):
                raise FmnError(
                    f"the inversion loss became {loss.item()} at step {step + 1}: lower the "
                    "learning rate (--lr); nothing was written"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for table, keep, ids in zip(tables, frozen, new_ids, strict=True):
                    mask = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
                    mask[ids] = False
                    table[mask] = keep[mask]  # only the new rows may change
                    rows_new = table[ids]
                    norm = rows_new.norm(dim=-1, keepdim=True)
                    table[ids] = F.normalize(rows_new, dim=-1) * (
                        norm + decay * (norm_target - norm))
            losses.append(loss.item())
            bar.update(loss=losses[-1])
        bar.close()
    except BaseException:
        # Leave no half-trained tokens behind in the caller's pipeline.
        for table, keep in zip(tables, frozen, strict=True):
            with torch.no_grad():
                table.copy_(keep)
        raise
    finally:
        for table in tables:
            table.requires_grad_(False)
            table.grad = None
    vectors = [table.detach()[ids].to("cpu", torch.float32).clone()
               for table, ids in zip(tables, new_ids, strict=True)]
    metadata = {
        "family": family_of(pipe),
        "init_words": init_words,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "templates": list(templates),
        "norm_target": norm_target,
        "init_sigma": init_sigma,
        "weight_decay": weight_decay,
        "flip_p": flip_p,
        "losses": losses,
        "versions": library_versions(),
    }
    return Embedding(tokens=tokens, vectors=vectors, metadata=metadata)


def _drawn(images: Sequence[Image.Image], resolution: int, flip_p: float,
           gen: torch.Generator) -> torch.Tensor:
    """One reference image, resized and randomly cropped, flipped with probability `flip_p`."""
    pixels = resize_random_crop(images[int(torch.randint(0, len(images), (1,), generator=gen))],
                                resolution, gen)  # (3, H, W)
    if flip_p > 0 and float(torch.rand((), generator=gen)) < flip_p:
        pixels = pixels.flip(-1)
    return pixels
