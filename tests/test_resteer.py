"""Re-steering end to end on tiny models: what trains, what is saved, determinism, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forget_me_not.attention import ProbeSet, install_probes
from forget_me_not.concepts import Concept, TokenMask, locate_in_pipeline, merge_positions
from forget_me_not.errors import FmnError
from forget_me_not.methods.fmn.loop import encode_rows
from forget_me_not.methods.token_rows.rows import word_token_ids
from forget_me_not.pipeline_io import added_cond, encode_prompt
from tiny_pipelines import fmn_config, make_tiny_pipeline, train_any


def _unet_out(pipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([300]), encoder_hidden_states=ehs, **kw).sample


def _cfg(**kw):
    base = dict(steps=2, reference="noise")
    return fmn_config(**{**base, **kw})


def test_config_validation():
    for bad in (dict(train="all"), dict(steps=0), dict(lr=-1.0), dict(reference="x"),
                dict(max_grad_norm=0.0), dict(lora_targets=("to_x",)),
                dict(mixed_precision="fp8"), dict(extra_positions="all"), dict(steps_per="x")):
        with pytest.raises(FmnError):
            fmn_config(**bad)
    two = fmn_config(steps=5, steps_per="concept")
    assert two.total_steps(2) == 10 and fmn_config(steps=5).total_steps(2) == 5


@pytest.mark.parametrize("train", ["lora", "xattn", "unet"])
def test_two_steps_train_only_the_intended_tensors(train):
    pipe = make_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    out_before = _unet_out(pipe)
    patch = train_any(pipe, [Concept("star")], _cfg(train=train), progress=False)

    # The pipeline is handed back unchanged.
    after = dict(pipe.unet.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(out_before, _unet_out(pipe))

    keys = list(patch.tensors)
    assert all(k.startswith("unet.") for k in keys)
    if train == "lora":
        assert patch.kind == "lora"
        assert all(".attn2." in k and (".lora_A." in k or ".lora_B." in k) for k in keys)
        targets = {k.split(".attn2.")[1].rsplit(".lora_", 1)[0] for k in keys}
        assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
        # lora_B starts at zero: training moved it.
        assert any(v.abs().sum() > 0 for k, v in patch.tensors.items() if "lora_B" in k)
        assert patch.lora_config["r"] == 4
    else:
        assert patch.kind == "delta"
        names = {k.removeprefix("unet.") for k in keys}
        assert names <= set(before)
        if train == "xattn":
            assert names and all(".attn2." in n for n in names)
        else:
            assert any(".attn2." not in n for n in names)
    meta = patch.metadata
    assert meta["family"] == "sd1" and meta["train"] == train and meta["steps"] == 2
    assert len(meta["losses"]) == 2 and meta["concepts"][0]["name"] == "star"
    assert {"torch", "diffusers", "peft", "transformers"} <= set(meta["versions"])


def test_deterministic_with_a_seed():
    runs = []
    for _ in range(2):
        pipe = make_tiny_pipeline("sd1")
        runs.append(train_any(pipe, [Concept("star")], _cfg(seed=3), progress=False))
    a, b = runs
    assert a.metadata["losses"] == b.metadata["losses"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    other = train_any(make_tiny_pipeline("sd1"), [Concept("star")], _cfg(seed=4), progress=False)
    assert other.metadata["losses"] != a.metadata["losses"]


def test_several_concepts_batched_and_sdxl():
    pipe = make_tiny_pipeline("sdxl")
    concepts = [Concept("star"), Concept("van gogh", "style")]
    patch = train_any(pipe, concepts, _cfg(batch_size=2), progress=False)
    assert patch.metadata["family"] == "sdxl"
    assert [c["name"] for c in patch.metadata["concepts"]] == ["star", "van gogh"]
    assert all(np.isfinite(patch.metadata["losses"]))


def test_reference_images_and_self_generated(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    pipe = make_tiny_pipeline("sd1")
    c = Concept("star", images=(tmp_path / "0.png", tmp_path / "1.png"))
    patch = train_any(pipe, [c], _cfg(reference="images"), progress=False)
    assert len(patch.metadata["losses"]) == 2
    patch = train_any(pipe, [Concept("star")],
                    _cfg(reference="self", n_self_images=1, self_steps=2), progress=False)
    assert len(patch.metadata["losses"]) == 2
    with pytest.raises(FmnError, match="no reference images"):
        train_any(pipe, [Concept("star")], _cfg(reference="images"), progress=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    small = Concept("star", images=(tmp_path / "small.png",))
    with pytest.raises(FmnError, match="smaller than the model's 16 px"):
        train_any(pipe, [small], _cfg(reference="images"), progress=False)


def test_clipping_really_clips():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train_any(make_tiny_pipeline("sd1"), [Concept("star")],
                _cfg(train="xattn", max_grad_norm=1e-4), progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2 and max(seen) <= 1e-4 * (1 + 1e-4)


@pytest.mark.parametrize("failure", ["nan", "interrupt"])
def test_failures_leave_the_pipeline_clean(monkeypatch, failure):
    pipe = make_tiny_pipeline("sd1")
    out_before = _unet_out(pipe)
    real_loss = ProbeSet.loss

    def broken(self, pixel_weights=None):
        loss = real_loss(self, pixel_weights)
        if failure == "interrupt":
            raise KeyboardInterrupt
        return loss * float("nan")

    monkeypatch.setattr(ProbeSet, "loss", broken)
    expected = FmnError if failure == "nan" else KeyboardInterrupt
    with pytest.raises(expected) as info:
        train_any(pipe, [Concept("star")], _cfg(), progress=False)
    if failure == "nan":
        assert "nothing was written" in str(info.value)
    assert not getattr(pipe.unet, "peft_config", None)
    assert all(type(p).__name__ != "CrossAttentionProbe"
               for p in pipe.unet.attn_processors.values())
    assert torch.equal(out_before, _unet_out(pipe))


def test_unknown_concept_words_suggest_inversion():
    with pytest.raises(FmnError, match="fmn invert"):
        train_any(make_tiny_pipeline("sd1"), [Concept("qwxz")], _cfg(), progress=False)


def test_sdxl_added_conditioning_matches_the_pipeline():

    pipe = make_tiny_pipeline("sdxl")
    rows = encode_rows(pipe, [Concept("star")], "none")
    added = added_cond(pipe, rows, 16, torch.device("cpu"))
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=32)
    assert torch.equal(added["time_ids"], expected)
    _, _, pooled, _ = pipe.encode_prompt("a photo of star", device="cpu",
                                         do_classifier_free_guidance=False)
    assert torch.equal(added["text_embeds"], pooled)
    assert rows[0].positions == [4]


def test_transparent_reference_pixels_are_not_resteered(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    clear = np.dstack([rgb, np.zeros((16, 16), np.uint8)])
    Image.fromarray(clear).save(tmp_path / "clear.png")
    pipe = make_tiny_pipeline("sd1")
    plain = train_any(pipe, [Concept("star", images=(tmp_path / "plain.png",))],
                    _cfg(reference="images"), progress=False)
    masked = train_any(pipe, [Concept("star", images=(tmp_path / "clear.png",))],
                     _cfg(reference="images"), progress=False)
    assert all(v > 1e-3 for v in plain.metadata["losses"])
    # Every pixel transparent: nothing is pushed, and the prediction is held where it was.
    assert max(masked.metadata["losses"]) < 1e-6
    assert len(masked.metadata["term_losses"]["transparent"]) == 2
    free = train_any(pipe, [Concept("star", images=(tmp_path / "clear.png",))],
                   _cfg(reference="images", transparent_weight=0.0), progress=False)
    assert free.metadata["losses"] == [0.0, 0.0]
    assert "transparent" not in free.metadata["term_losses"]
    with pytest.raises(FmnError, match="transparent_weight"):
        fmn_config(transparent_weight=-1.0)


def test_several_preserve_prompts_per_step():
    pipe = make_tiny_pipeline("sd1")
    prompts = ("a photo of a moon", "a cat", "a red car")
    one = train_any(pipe, [Concept("star")],
                  _cfg(preserve_weight=5.0, preserve_prompts=prompts, lr=1e-2), progress=False)
    three = train_any(pipe, [Concept("star")],
                    _cfg(preserve_weight=5.0, preserve_prompts=prompts, preserve_batch=3, lr=1e-2),
                    progress=False)
    assert three.metadata["settings"]["preserve_batch"] == 3
    assert len(three.metadata["term_losses"]["preserve"]) == 2
    assert three.metadata["term_losses"]["preserve"][0] == 0.0  # nothing trained yet at step 1
    # step 2 compares one prompt in the first run, all three in the second
    assert three.metadata["term_losses"]["preserve"][1] > 0
    preserve = [run.metadata["term_losses"]["preserve"] for run in (three, one)]
    assert preserve[0][1] != preserve[1][1]
    with pytest.raises(FmnError, match="preserve_batch"):
        fmn_config(preserve_batch=0)


def _probe_loss(pipe, prompt, words):
    """FMN's attention loss for `prompt` on one fixed noisy latent."""
    embeds, pooled = encode_prompt(pipe, prompt)
    kw = {}
    if pooled is not None:
        kw["added_cond_kwargs"] = {"text_embeds": pooled,
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    positions = merge_positions(locate_in_pipeline(pipe, prompt, words, "none"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 4, 4, generator=g)
    probes = install_probes(pipe.unet)
    try:
        probes.activate(TokenMask.from_positions([positions], embeds.shape[1]))
        with torch.no_grad():
            pipe.unet(x, torch.tensor([500]), encoder_hidden_states=embeds, **kw)
        return float(probes.loss())
    finally:
        probes.remove()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_token_rows_train_only_the_words_and_lower_their_attention(family):
    pipe = make_tiny_pipeline(family)
    target, other = "a photo of a star", "a photo of a cat"
    with torch.no_grad():
        star_before, other_before = encode_prompt(pipe, target), encode_prompt(pipe, other)
    loss_before = _probe_loss(pipe, target, "star")
    unet_before = {n: p.detach().clone() for n, p in pipe.unet.state_dict().items()}
    patch = train_any(pipe, [Concept("star")], _cfg(train="tokens", steps=20, lr=0.1),
                    progress=False)

    # An embedding patch: per text encoder, the rows of the word "star" and nothing else.
    assert patch.kind == "embedding" and patch.metadata["train"] == "token_rows"
    ids = word_token_ids(pipe, "star")
    encoders = ["text_encoder", "text_encoder_2"][: len(ids)]
    assert set(patch.tensors) == {f"{e}.{k}" for e in encoders
                                  for k in ("token_ids", "token_delta")}
    for enc, want in zip(encoders, ids, strict=True):
        assert patch.tensors[f"{enc}.token_ids"].tolist() == want
        assert patch.tensors[f"{enc}.token_delta"].abs().sum() > 0
    # The UNet and the text encoders are handed back unchanged.
    assert all(torch.equal(unet_before[n], p) for n, p in pipe.unet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(encode_prompt(pipe, target)[0], star_before[0])

    patch.apply(pipe)
    with torch.no_grad():
        star_after, other_after = encode_prompt(pipe, target), encode_prompt(pipe, other)
    assert not torch.equal(star_after[0], star_before[0])
    # A prompt without the word keeps exactly its text states (and its pooled embedding).
    assert torch.equal(other_after[0], other_before[0])
    if family == "sdxl":
        assert torch.equal(other_after[1], other_before[1])
    # The UNet attends less to the word than before.
    assert _probe_loss(pipe, target, "star") < 0.9 * loss_before
    patch.remove(pipe)
    with torch.no_grad():
        assert torch.equal(encode_prompt(pipe, target)[0], star_before[0])


def test_token_rows_are_deterministic_and_refuse_inverted_tokens():
    a, b = (train_any(make_tiny_pipeline("sd1"), [Concept("star")], _cfg(train="tokens", seed=2),
                    progress=False) for _ in range(2))
    assert a.metadata["losses"] == b.metadata["losses"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    with pytest.raises(FmnError, match="--method fmn"):
        train_any(make_tiny_pipeline("sd1"), [Concept("star", token_words="star")],
                _cfg(train="tokens"), progress=False)
