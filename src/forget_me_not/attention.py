"""The cross-attention probe: a diffusers attention processor that can keep attention columns.

Installed on every cross-attention layer of a UNet (modules named `...attn2`). While inactive
it hands the call to the processor it replaced, so the model's outputs stay bit-identical.
While active it computes the post-softmax probabilities explicitly (the default SDPA kernel
never materialises them), keeps the columns at the concept's token positions and builds the
layer's output from those same probabilities, so gradients flow through what is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from forget_me_not.concepts import TokenMask
from forget_me_not.errors import FmnError


@dataclass
class ProbeState:
    """Shared by all probes of one UNet: whether they record, what, and what they kept."""

    active: bool = False
    mask: TokenMask | None = None
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B*heads, P, k_max)


class CrossAttentionProbe:
    """Attention processor for one cross-attention layer (see module docstring)."""

    def __init__(self, name: str, state: ProbeState, original: Any) -> None:
        self.name = name
        self.state = state
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.state.active or encoder_hidden_states is None:
            # Called the way Attention.forward calls a processor, so any processor works.
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(
                attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, **kwargs,
            )
        return self._probe(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _probe(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        # Same steps as diffusers' AttnProcessor, keeping the probabilities on the way.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)  # (B*heads, P, head_dim), batch-major
        key = attn.head_to_batch_dim(key)  # (B*heads, T, head_dim)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, P, T)
        self._keep(probs, attn.heads, batch)

        hidden_states = torch.bmm(probs, value)  # (B*heads, P, head_dim)
        hidden_states = attn.batch_to_head_dim(hidden_states)  # (B, P, heads*head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _keep(self, probs: torch.Tensor, heads: int, batch: int) -> None:
        mask = self.state.mask
        if mask is None:
            raise FmnError("cross-attention probes are active but no token mask was set")
        if mask.batch_size != batch:
            raise FmnError(
                f"token mask has {mask.batch_size} rows but the UNet batch has {batch}: "
                "build one mask row per batch row"
            )
        # Rows are batch-major (row = b * heads + h), so each sample's mask is repeated per
        # head with repeat_interleave; the official code's `repeat` mis-ordered them.
        index = mask.index.to(probs.device).repeat_interleave(heads, dim=0)  # (B*heads, k)
        valid = mask.valid.to(probs.device).repeat_interleave(heads, dim=0)
        index = index[:, None, :].expand(-1, probs.shape[1], -1)  # (B*heads, P, k)
        kept = probs.gather(2, index) * valid[:, None, :].to(probs.dtype)  # (B*heads, P, k)
        self.state.kept[self.name] = kept


class ProbeSet:
    """The probes installed on one UNet; `remove()` puts the original processors back."""

    def __init__(self, unet: torch.nn.Module, modules: dict[str, Attention],
                 originals: dict[str, Any], state: ProbeState) -> None:
        self.unet = unet
        self.modules = modules
        self.originals = originals
        self.state = state

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def activate(self, mask: TokenMask) -> None:
        self.state.mask = mask
        self.state.kept.clear()
        self.state.active = True

    def deactivate(self) -> None:
        self.state.active = False
        self.state.mask = None
        self.state.kept.clear()

    def kept(self) -> list[torch.Tensor]:
        """Kept probabilities of the last forward, one tensor per layer, in layer order."""
        self._check_installed()
        missing = [n for n in self.modules if n not in self.state.kept]
        if missing:
            raise FmnError(
                f"{len(missing)} cross-attention layers recorded nothing (first: {missing[0]}): "
                "was the probe active during the forward pass?"
            )
        return [self.state.kept[n] for n in self.modules]

    def loss(self, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The re-steering loss: the plain L2 norm of every kept probability, all layers.

        `pixel_weights` (B, 1, H, W) in [0, 1], optional: each pixel's squared probabilities
        count with its weight (resized by area to every layer's grid), so a region weighted 0
        keeps attending to the concept.
        """
        kept = self.kept()
        if pixel_weights is None:
            return torch.cat([k.flatten() for k in kept]).norm()
        batch, _, height, width = pixel_weights.shape
        parts = []
        for k in kept:  # (B*heads, P, k)
            pixels = k.shape[1]
            h = max(1, round(math.sqrt(pixels * height / width)))
            w = pixels // h
            if h * w != pixels:
                raise FmnError(f"cannot lay {pixels} attention pixels on a {height}x{width} grid")
            grid = F.interpolate(pixel_weights.to(k.dtype), size=(h, w), mode="area")
            grid = grid.reshape(batch, 1, h * w, 1).to(k.device)
            heads = k.shape[0] // batch
            parts.append((k.reshape(batch, heads, pixels, -1) * grid.sqrt()).flatten())
        return torch.cat(parts).norm()

    def _check_installed(self) -> None:
        # Something (e.g. enable_xformers_memory_efficient_attention) may have swapped the
        # processors; the official code then silently trained on an empty loss.
        for name, module in self.modules.items():
            if not isinstance(module.processor, CrossAttentionProbe):
                raise FmnError(
                    f"the attention processor of {name} was replaced after the probes were "
                    "installed (xformers or another processor?): do not change processors "
                    "during re-steering"
                )

    def remove(self) -> None:
        """Put back the processors that were there before `install_probes`."""
        self.deactivate()
        for name, module in self.modules.items():
            module.set_processor(self.originals[name])
        self.modules = {}

    def __enter__(self) -> ProbeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """The UNet's cross-attention modules by name (diffusers names them `...attn2`)."""
    found = {
        name: m
        for name, m in unet.named_modules()
        if name.endswith("attn2") and isinstance(m, Attention)
    }
    if not found:
        raise FmnError(
            "the UNet has no cross-attention layers named 'attn2': re-steering needs a "
            "text-conditioned diffusers UNet"
        )
    return found


def install_probes(unet: torch.nn.Module) -> ProbeSet:
    """Install an inactive probe on every cross-attention layer; other layers stay untouched."""
    modules = cross_attention_modules(unet)
    for name, m in modules.items():
        if isinstance(m.processor, CrossAttentionProbe):
            raise FmnError(f"probes are already installed on {name}: remove them first")
    state = ProbeState()
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(CrossAttentionProbe(name, state, originals[name]))
    return ProbeSet(unet, modules, originals, state)
