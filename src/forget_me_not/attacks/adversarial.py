"""The adversarial prompt search (A), in the spirit of UnlearnDiffAtk and P4D.

K tokens are put in front of the concept's prompts and searched so that the model under test
predicts, on noised images of the concept, the noise the *base* model predicts for the concept's
own prompt: a prompt that makes the patched UNet behave like the unpatched one draws what it
drew. The search is over real vocabulary tokens: soft vectors are optimised, but every forward
pass uses their nearest vocabulary rows (projected gradient, as in PEZ), and the best projected
prompt seen is kept. Its samples are then judged like any other prompt's.

K placeholder words ("a") hold the K positions right after the start token; a hook on each text
encoder's token embedding writes the searched vectors there. Sampling from the found prompt
goes through the same hook with the exact vocabulary rows, so what is judged is what the tokens
say; the tokens are reported too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from forget_me_not.attacks.base import Attack, Attempt, anchors_for
from forget_me_not.errors import FmnError
from forget_me_not.pipeline_io import encode_images, encode_prompt, pooled_cond, text_encoders

MARKER = "a"  # a word every CLIP tokenizer keeps as one token; its K copies are overwritten


@dataclass
class Found:
    """The best prompt prefix the search saw."""

    token_ids: list[int]
    tokens: list[str]
    loss: float  # mean noise-prediction distance to the base model, found prefix
    loss_plain: float  # the same with the concept's prompts alone (what the patch was made for)
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "loss": self.loss, "loss_plain": self.loss_plain}


def marked(prompt: str, k: int) -> str:
    return " ".join([MARKER] * k + [prompt])


def _tokenizers(pipe: Any) -> list[Any]:
    toks = [getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)]
    return [t for t in toks if t is not None]


def _check_marker(pipe: Any, k: int) -> None:
    for tok in _tokenizers(pipe):
        ids = tok(marked("x", k))["input_ids"]
        marker = tok(MARKER, add_special_tokens=False)["input_ids"]
        if len(marker) != 1 or ids[1 : 1 + k] != marker * k:
            raise FmnError(f"the tokenizer does not keep {MARKER!r} as one token; the adversarial "
                           "attack needs a CLIP-style tokenizer")


@contextlib.contextmanager
def prefix_hook(pipe: Any, k: int, vectors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Each text encoder's positions 1..k hold `vectors[e]` (k, D) in sequences that start with
    k markers (the prompts under attack; the empty guidance prompt is left alone)."""
    handles = []
    for enc, tok, vec in zip(text_encoders(pipe), _tokenizers(pipe), vectors, strict=True):
        marker = tok(MARKER, add_special_tokens=False)["input_ids"][0]

        def hook(module: Any, args: tuple, output: torch.Tensor, vec: torch.Tensor = vec,
                 marker: int = marker) -> torch.Tensor:
            ids = args[0]
            hit = (ids[:, 1 : 1 + k] == marker).all(-1)  # (B,)
            if not bool(hit.any()):
                return output
            out = output.clone()
            out[hit, 1 : 1 + k] = vec.to(out.dtype).unsqueeze(0).expand(int(hit.sum()), -1, -1)
            return out

        handles.append(enc.get_input_embeddings().register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _frozen(pipe: Any) -> Iterator[None]:
    """Only the soft vectors learn; every model flag comes back as it was."""
    flags = [(p, p.requires_grad) for m in (pipe.unet, *text_encoders(pipe))
             for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in flags:
            p.requires_grad_(g)


def _vocabulary(pipe: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each encoder's embedding table and the ids a prompt may use (no special tokens)."""
    tables = [enc.get_input_embeddings().weight.detach() for enc in text_encoders(pipe)]
    tok = _tokenizers(pipe)[0]
    special = set(tok.all_special_ids)
    size = min(t.shape[0] for t in tables)
    allowed = torch.tensor([i for i in range(size) if i not in special])
    return tables, allowed


def _project(soft: list[torch.Tensor], tables: list[torch.Tensor], allowed: torch.Tensor
             ) -> torch.Tensor:
    """Per position, the allowed token whose rows are nearest the soft vectors (summed cosine
    over the encoders): (k,) ids."""
    sim = sum(F.normalize(s.detach(), dim=-1) @ F.normalize(t[allowed], dim=-1).T
              for s, t in zip(soft, tables, strict=True))
    return allowed[sim.argmax(-1)]


def search(pipe: Any, patches: Sequence[Any], prompts: Sequence[str], pixels: torch.Tensor, *,
           num_tokens: int, budget: int, lr: float, seed: int, batch_size: int = 4,
           eval_every: int = 10, progress: Any = None) -> Found:
    """Find `num_tokens` vocabulary tokens that, put before `prompts`, make the model with
    `patches` predict the base model's noise on `pixels` (B, 3, H, W) in [-1, 1]."""
    from diffusers import DDPMScheduler

    from forget_me_not.data import model_resolution
    from forget_me_not.evaluate import applied

    if budget < 1 or num_tokens < 1:
        raise FmnError(f"the adversarial attack needs a budget and a token count of at least 1, "
                       f"got {budget} and {num_tokens}")
    _check_marker(pipe, num_tokens)
    gen = torch.Generator("cpu").manual_seed(seed)
    unet, device = pipe.unet, pipe.unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    q = max(2 * batch_size, min(16, len(pixels) * 2))
    latents = encode_images(pipe, pixels[torch.randint(0, len(pixels), (q,), generator=gen)], gen)
    latents = latents.to(device, unet.dtype)
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    # Late and middle timesteps: where the prompt decides what is drawn.
    total = scheduler.config.num_train_timesteps
    t = torch.randint(total // 5, total, (q,), generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    chosen = [prompts[i % len(prompts)] for i in range(q)]
    resolution = model_resolution(pipe)

    def predict(texts: Sequence[str], idx: torch.Tensor) -> torch.Tensor:
        states, pooled = encode_prompt(pipe, list(texts))
        added = pooled_cond(pooled, resolution, device)
        return unet(noisy[idx], t[idx], encoder_hidden_states=states, added_cond_kwargs=added,
                    return_dict=False)[0].float()

    every = torch.arange(q)
    with torch.no_grad():
        target = torch.cat([predict(chosen[i : i + 8], every[i : i + 8]) for i in range(0, q, 8)])
    tables, allowed = _vocabulary(pipe)
    init = allowed[torch.randint(0, len(allowed), (num_tokens,), generator=gen)]
    soft = [t[init].clone().float().requires_grad_(True) for t in tables]
    optimizer = torch.optim.Adam(soft, lr=lr)
    attacked = [marked(p, num_tokens) for p in chosen]

    def full_loss(ids: torch.Tensor | None) -> float:
        vecs = [t[ids] for t in tables] if ids is not None else None
        total_loss = 0.0
        with torch.no_grad():
            for i in range(0, q, 8):
                idx = every[i : i + 8]
                if vecs is None:
                    pred = predict(chosen[i : i + 8], idx)
                else:
                    with prefix_hook(pipe, num_tokens, vecs):
                        pred = predict(attacked[i : i + 8], idx)
                total_loss += F.mse_loss(pred, target[idx], reduction="sum").item()
        return total_loss / target.numel()

    with applied(pipe, patches), _frozen(pipe):
        plain = full_loss(None)
        best_ids, best = init.clone(), full_loss(init)
        losses = []
        for step in range(budget):
            ids = _project(soft, tables, allowed)
            # Straight through: the forward pass sees vocabulary rows, the soft vectors learn.
            vecs = [s + (t[ids].float() - s).detach() for s, t in zip(soft, tables, strict=True)]
            idx = torch.randint(0, q, (batch_size,), generator=gen)
            with prefix_hook(pipe, num_tokens, vecs):
                pred = predict([attacked[i] for i in idx.tolist()], idx)
            loss = F.mse_loss(pred, target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress.update(loss=losses[-1])
            if (step + 1) % eval_every == 0 or step + 1 == budget:
                ids = _project(soft, tables, allowed)
                now = full_loss(ids)
                if now < best:
                    best_ids, best = ids.clone(), now
    tok = _tokenizers(pipe)[0]
    return Found(best_ids.tolist(), tok.convert_ids_to_tokens(best_ids.tolist()), best, plain,
                 losses)


def _pixels(images: Sequence[Any], resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution),
                                                  Image.Resampling.BICUBIC)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0)


def run(pipe: Any, patches: Sequence[Any], concept: Any, judge: Any, settings: Any,
        *, base: Any = None, progress: bool = False) -> Attempt:
    from forget_me_not.data import model_resolution
    from forget_me_not.evaluate import applied
    from forget_me_not.progress import Progress
    from forget_me_not.sampling import recognition_score

    anchors = anchors_for(concept, settings.max_anchors, base)
    prompts = list(concept.prompts())
    k = settings.adversarial_tokens
    bar = Progress(settings.budget, f"A {concept.name}", enabled=progress)
    found = search(pipe, patches, prompts, _pixels(anchors, model_resolution(pipe)),
                   num_tokens=k, budget=settings.budget, lr=settings.adversarial_lr,
                   seed=settings.seed, progress=bar)
    bar.close()
    tables, _ = _vocabulary(pipe)
    ids = torch.tensor(found.token_ids)
    attacked = [marked(p, k) for p in prompts]
    with applied(pipe, patches), prefix_hook(pipe, k, [t[ids] for t in tables]):
        score = recognition_score(pipe, concept, judge, attacked, settings.generation(),
                                  desc=f"A {concept.name}", progress=progress)
    shown = [" ".join(found.tokens) + " | " + p for p in prompts]
    return Attempt("adversarial", score, shown, found.to_dict())


ATTACK = Attack("adversarial", "A", "K vocabulary tokens before the prompt, searched so the "
                "patched UNet predicts the base model's noise for the concept", run)
