"""The cross-attention probe: bit-identical when inactive, the paper's loss when active."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from forget_me_not.attention import CrossAttentionProbe, install_probes
from forget_me_not.concepts import TokenMask
from forget_me_not.errors import FmnError
from tiny_pipelines import make_tiny_pipeline


def _inputs(pipe, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500][:batch])
    kw = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch),
        }
    return x, t, ehs, kw


def _reference_loss(unet, x, t, ehs, kw, rows: list[list[int]]) -> torch.Tensor:
    """The loss via diffusers' own path: default processors, hooks, get_attention_scores."""
    unet.set_attn_processor(AttnProcessor2_0())
    kept = []

    def hook(attn: Attention, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if hidden.ndim == 4:
            b, c, h, w = hidden.shape
            hidden = hidden.view(b, c, h * w).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, P, T)
        probs = probs.view(len(rows), attn.heads, *probs.shape[1:])  # (B, heads, P, T)
        for b, positions in enumerate(rows):
            kept.append(probs[b][:, :, positions].flatten())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for n, m in unet.named_modules() if n.endswith("attn2")]
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ehs, **kw)
    finally:
        for h in handles:
            h.remove()
    return torch.norm(torch.cat(kept))


@pytest.mark.parametrize("rows", [[[4, 5]], [[4, 5], [4]], [[3], [6, 7, 8]]])
def test_loss_matches_reference(rows):
    pipe = make_tiny_pipeline("sd1")
    x, t, ehs, kw = _inputs(pipe, batch=len(rows))
    ref = _reference_loss(pipe.unet, x, t, ehs, kw, rows)
    probes = install_probes(pipe.unet)
    probes.activate(TokenMask.from_positions(rows, 77))
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=ehs, **kw)
    loss = probes.loss()
    probes.remove()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert ref.item() > 0


def test_batch_rows_keep_their_own_columns():
    # Row 0 keeps column 2, row 1 column 9: each row's kept values must be its own column.
    pipe = make_tiny_pipeline("sd1")
    x, t, ehs, kw = _inputs(pipe, batch=2)
    probes = install_probes(pipe.unet)
    probes.activate(TokenMask.from_positions([[2], [9, 10]], 77))
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=ehs, **kw)
    kept = probes.kept()
    probes.remove()
    first = kept[0]  # (B*heads, P, 2)
    heads = first.shape[0] // 2
    assert torch.all(first[:heads, :, 1] == 0)  # row 0 has one position: the pad is zero
    assert torch.all(first[heads:, :, 1] > 0)
    # Compare with the single-row run of row 1 alone.
    probes = install_probes(pipe.unet)
    probes.activate(TokenMask.from_positions([[9, 10]], 77))
    kw1 = {k: {kk: vv[1:] for kk, vv in v.items()} for k, v in kw.items()}
    with torch.no_grad():
        pipe.unet(x[1:], t[1:], encoder_hidden_states=ehs[1:], **kw1)
    alone = probes.kept()[0]
    probes.remove()
    assert torch.allclose(first[heads:], alone, atol=1e-6)


def test_inactive_probe_and_removal_are_bit_identical(family):
    pipe = make_tiny_pipeline(family)
    x, t, ehs, kw = _inputs(pipe)
    originals = dict(pipe.unet.attn_processors)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes = install_probes(pipe.unet)
        assert all(isinstance(p, CrossAttentionProbe) == n.endswith("attn2.processor")
                   for n, p in pipe.unet.attn_processors.items())
        inactive = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes.activate(TokenMask.from_positions([[4], [5]], 77))
        active = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes.remove()
        after = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
    assert torch.equal(base, inactive)
    assert torch.equal(base, after)
    assert torch.allclose(base, active, atol=1e-4)  # explicit softmax vs SDPA: rounding only
    assert all(pipe.unet.attn_processors[n] is p for n, p in originals.items())


def test_gradients_reach_cross_attention_keys():
    pipe = make_tiny_pipeline("sd1")
    x, t, ehs, kw = _inputs(pipe, batch=1)
    ehs.requires_grad_(True)
    probes = install_probes(pipe.unet)
    probes.activate(TokenMask.from_positions([[4]], 77))
    pipe.unet(x, t, encoder_hidden_states=ehs, **kw)
    probes.loss().backward()
    probes.remove()
    key = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2")).to_k.weight
    assert key.grad is not None and key.grad.abs().sum() > 0
    assert ehs.grad[0, 4].abs().sum() > 0


def test_replaced_processor_is_detected_not_silently_empty():
    pipe = make_tiny_pipeline("sd1")
    x, t, ehs, kw = _inputs(pipe, batch=1)
    probes = install_probes(pipe.unet)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # what enabling xformers would do
    probes.activate(TokenMask.from_positions([[4]], 77))
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=ehs, **kw)
    with pytest.raises(FmnError, match="replaced"):
        probes.loss()


def test_probe_coexists_with_lora_on_projections():
    from peft import LoraConfig

    pipe = make_tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_k", "to_v"]))
    x, t, ehs, kw = _inputs(pipe)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes = install_probes(pipe.unet)
        inactive = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes.activate(TokenMask.from_positions([[4], [4]], 77))
        active = pipe.unet(x, t, encoder_hidden_states=ehs, **kw).sample
        probes.remove()
    assert torch.equal(base, inactive)
    assert torch.allclose(base, active, atol=1e-4)


def test_double_install_refused():
    pipe = make_tiny_pipeline("sd1")
    probes = install_probes(pipe.unet)
    with pytest.raises(FmnError, match="already installed"):
        install_probes(pipe.unet)
    probes.remove()


def test_pixel_weights_select_where_the_loss_counts():
    pipe = make_tiny_pipeline("sd1")
    x, t, ehs, kw = _inputs(pipe, batch=2)
    probes = install_probes(pipe.unet)
    probes.activate(TokenMask.from_positions([[4, 5], [3]], 77))
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=ehs, **kw)
    plain = probes.loss()
    size = x.shape[-1] * 2  # pixel grid of any size: it is area-resized to each layer
    ones = probes.loss(torch.ones(2, 1, size, size))
    zeros = probes.loss(torch.zeros(2, 1, size, size))
    top = torch.zeros(2, 1, size, size)
    top[:, :, : size // 2] = 1.0
    bottom = 1.0 - top
    halves = (probes.loss(top) ** 2 + probes.loss(bottom) ** 2).sqrt()
    first_row_only = torch.stack([torch.ones(1, size, size), torch.zeros(1, size, size)])
    first_row = probes.loss(first_row_only)
    probes.remove()
    assert abs(ones.item() - plain.item()) < 1e-6
    assert zeros.item() == 0.0
    assert abs(halves.item() - plain.item()) < 1e-5  # the two halves partition the loss
    assert 0 < first_row.item() < plain.item()
