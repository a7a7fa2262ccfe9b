"""The `paper` recipe against a reference loop written from the official code's definitions.

The reference below follows SHI-Labs/Forget-Me-Not's `train_attn.py`: the concept mask from the
dataset (`tok_id == pooler_token_id` marks every end-of-text id), a processor on every `attn2`
that keeps `attn.get_attention_scores` at the mask, loss `torch.cat(kept).norm()`, AdamW over
`unet.parameters()`. Its random draws are taken in the same order as the project's loop (image
index, crop, VAE sample, noise, timestep) so the two can be compared step by step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from forget_me_not import recipes
from forget_me_not.concepts import Concept
from forget_me_not.data import resize_random_crop
from forget_me_not.methods.fmn.train import train
from tiny_pipelines import make_tiny_pipeline

STEPS = 3


def _official_mask(tokenizer, prompt: str, words: str) -> torch.Tensor:
    """ForgetMeNotDataset.__getitem__: concept token span, and (use_pooler) every eos id."""
    prompt_ids = tokenizer(prompt, truncation=True, padding="max_length",
                           max_length=tokenizer.model_max_length).input_ids
    concept_ids = tokenizer(words, add_special_tokens=False).input_ids
    pooler = tokenizer("<|endoftext|>", add_special_tokens=False).input_ids[0]
    positions = [0] * tokenizer.model_max_length
    for i, tok in enumerate(prompt_ids):
        if tok == concept_ids[0] and prompt_ids[i:i + len(concept_ids)] == concept_ids:
            positions[i:i + len(concept_ids)] = [1] * len(concept_ids)
        if tok == pooler:
            positions[i] = 1
    return torch.tensor(positions, dtype=torch.bool)[None]  # (1, T)


class _OfficialProcessor:
    """MyCrossAttnProcessor of train_attn.py, on the current diffusers Attention API."""

    def __init__(self, kept: list, mask: torch.Tensor) -> None:
        self.kept, self.mask = kept, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 **_):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, P, T)
        heads = probs.shape[0] // self.mask.shape[0]
        self.kept.append(probs.masked_select(self.mask[:, None, :].repeat(heads, 1, 1)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def _reference(pipe, image: Image.Image, prompt: str, words: str, cfg) -> tuple[list, dict]:
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    mask = _official_mask(pipe.tokenizer, prompt, words)
    kept: list = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(_OfficialProcessor(kept, mask))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=2e-6, betas=(0.9, 0.999),
                                  weight_decay=0.01, eps=1e-8)
    ids = pipe.tokenizer(prompt, truncation=True, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    losses = []
    for _ in range(STEPS):
        torch.randint(0, 1, (1,), generator=gen)  # which reference image (there is one)
        pixels = resize_random_crop(image, 16, gen)[None]
        with torch.no_grad():
            dist = pipe.vae.encode(pixels).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen))
            latents = latents * pipe.vae.config.scaling_factor  # latent_dist.sample()
            hidden = pipe.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen)
        kept.clear()
        pipe.unet(scheduler.add_noise(latents, noise, t), t, hidden)
        loss = torch.cat(kept).norm()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, mask


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_paper_recipe_matches_the_official_loop(family, tmp_path):
    ours_pipe, ref_pipe = make_tiny_pipeline(family), make_tiny_pipeline(family)
    if family == "sd2":  # SD 2.x pads with "!", so use_pooler keeps the one end-of-text token
        for pipe in (ours_pipe, ref_pipe):
            pipe.tokenizer.pad_token = "!"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    image.save(tmp_path / "star.png")
    concept = Concept("star", images=(tmp_path / "star.png",))
    cfg = dataclasses.replace(recipes.load("paper").parts[0].config, steps=STEPS)
    before = {n: p.detach().clone() for n, p in ours_pipe.unet.named_parameters()}
    patch = train(ours_pipe, [concept], cfg, progress=False)
    ref_losses, mask = _reference(ref_pipe, image, "a photo of star", "star", cfg)

    from forget_me_not.concepts import locate_in_pipeline
    ours = locate_in_pipeline(ours_pipe, "a photo of star", "star", cfg.extra_positions)[0]
    assert ours == mask[0].nonzero().flatten().tolist()
    n_eos = int((torch.tensor(ours_pipe.tokenizer("a photo of star", padding="max_length",
                 max_length=ours_pipe.tokenizer.model_max_length).input_ids)
                 == ours_pipe.tokenizer.eos_token_id).sum())
    assert len(ours) == 1 + n_eos and (n_eos == 1) == (family == "sd2")
    np.testing.assert_allclose(patch.metadata["losses"], ref_losses, atol=1e-5, rtol=0)
    # Whole UNet, as the reference: the same parameters changed, text encoder and VAE did not.
    ref_changed = {n for n, p in ref_pipe.unet.named_parameters()
                   if not torch.equal(p, before[n])}
    assert patch.kind == "delta"
    assert {k.removeprefix("unet.") for k in patch.tensors} == ref_changed
    assert ref_changed  # what the attention loss reaches (to_v/to_out of late layers: no)
    assert not any(p.requires_grad for p in ours_pipe.text_encoder.parameters())


def test_paper_recipe_runs_the_inversion_stage_first(tmp_path, monkeypatch):
    import forget_me_not.api as api

    calls = []
    real_inversion, real_train = api.train_inversion, train

    def short_inversion(pipe, images, **kw):
        calls.append(("inversion", kw["init_words"], kw["init_sigma"], kw["flip_p"]))
        return real_inversion(pipe, images, **{**kw, "steps": 2})

    def traced_train(pipe, concepts, config, progress=True):
        calls.append(("resteer", concepts[0].token_words))
        return real_train(pipe, concepts, dataclasses.replace(config, steps=1), progress=False)

    monkeypatch.setattr(api, "train_inversion", short_inversion)
    monkeypatch.setattr("forget_me_not.methods.fmn.train.train", traced_train)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    pipe = make_tiny_pipeline("sd1")
    patch = api.forget(pipe, Concept("star", images=(tmp_path / "a.png",)), recipe="paper",
                       progress=False)
    assert calls[0] == ("inversion", "star", 1.0, 0.5)
    assert calls[1][0] == "resteer" and len(calls[1][1].split()) == 4  # the learnt tokens
    assert patch.metadata["inversion"][0]["tokens"] == calls[1][1]
    assert patch.metadata["recipe"] == "paper"
