"""What FMN trains in the UNet: a LoRA on cross-attention, the cross-attention weights, or every
weight. Each sets its tensors up, computes the base model on request, reads out the result as
patch tensors, and puts the UNet back as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.pipeline_io import Row

TRAIN_ADAPTER = "fmn_training"


def attention_level(name: str, n_levels: int) -> int:
    """A module's UNet level, 0 at the latent's full resolution: down block i is level i, up
    block j level n-1-j, the middle block the coarsest."""
    part, _, rest = name.partition(".")
    if part == "mid_block":
        return n_levels - 1
    index = int(rest.split(".")[0])
    return index if part == "down_blocks" else n_levels - 1 - index


def coarse_modules(unet: Any, targets: Sequence[str]) -> list[str]:
    """The cross-attention projections in `targets` of every level but the finest one that
    has cross-attention: peft's target_modules for a patch that keeps the coarse levels."""
    n_levels = len(unet.config.block_out_channels)
    names = [n for n, _ in unet.named_modules()
             if any(n.endswith(f"attn2.{t}") for t in targets)]
    finest = min(attention_level(n, n_levels) for n in names)
    chosen = [n for n in names if attention_level(n, n_levels) > finest]
    if not chosen:
        raise FmnError("ship_levels=coarse: this UNet has cross-attention at one level only; "
                       "use ship_levels=all")
    return chosen


def coarse_part(modules: Sequence[str], tensors: dict[str, torch.Tensor],
                lora_config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trained LoRA's tensors and config for `modules` only (see coarse_modules)."""
    kept = {k: v for k, v in tensors.items()
            if any(k.startswith(f"unet.{m}.") for m in modules)}
    return kept, {**lora_config, "target_modules": list(modules)}


@contextlib.contextmanager
def _scaled_off(switched: list[tuple[torch.nn.Module, str]]) -> Iterator[None]:
    """Within: each (peft layer, adapter) adds nothing (peft adds scaling * B(A(x)))."""
    saved = [m.scaling[name] for m, name in switched]
    for m, name in switched:
        m.scaling[name] = 0.0
    try:
        yield
    finally:
        for (m, name), value in zip(switched, saved, strict=True):
            m.scaling[name] = value


class UnetTrainable:
    """`config.train` in ("lora", "xattn", "unet", "noxattn": every weight outside attn2)."""

    def __init__(self, unet: torch.nn.Module, config: Any) -> None:
        self.unet = unet
        self.config = config
        self.originals: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.adapter: str | None = None
        self.active_before: list[str] = []
        self.was_training = unet.training

    def setup(self) -> list[torch.nn.Parameter]:
        cfg, unet = self.config, self.unet
        if cfg.train == "lora":
            self._add_lora()
        else:
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    continue  # adapters of applied patches are not ours to train
                in_xattn = ".attn2." in f".{name}"
                if cfg.train == "unet" or (in_xattn if cfg.train == "xattn" else
                                           cfg.train == "noxattn" and not in_xattn):
                    self.params[name] = p
            low = [n for n, p in self.params.items() if p.dtype != torch.float32]
            if low:
                raise FmnError(
                    f"train={cfg.train} updates full weights, which must be float32 (found "
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

    def _add_lora(self) -> None:
        from peft import LoraConfig

        unet = self.unet
        if getattr(unet, "_hf_peft_config_loaded", False):
            self.active_before = list(unet.active_adapters())
        self.adapter = TRAIN_ADAPTER
        lora = LoraConfig(**self.lora_config())
        # peft draws lora_A from the global RNG: seed it so runs repeat, without disturbing
        # the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
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

    def live(self, rows: Sequence[Row]) -> list[Row]:
        """The rows' text states as the model in training sees them: unchanged (text frozen)."""
        return list(rows)

    @contextlib.contextmanager
    def base_weights(self, original: bool = True) -> Iterator[None]:
        """Within: the UNet computes as the base model (the trained delta switched off).

        `original`: the patches named in `compare_without` are switched off as well.
        """
        if self.adapter is not None:
            # peft adds scaling[adapter] * B(A(x)); a zero scaling gives exactly the base output.
            names = [self.adapter, *(self.config.compare_without if original else ())]
            with _scaled_off([(m, name) for m in self.unet.modules()
                              if isinstance(getattr(m, "scaling", None), dict)
                              for name in names if name in m.scaling]):
                yield
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

    @contextlib.contextmanager
    def only_modules(self, modules: Sequence[str] | None) -> Iterator[None]:
        """Within: the trained LoRA acts on `modules` only (None: everywhere), as a patch that
        ships those modules computes."""
        if modules is None or self.adapter is None:
            yield
            return
        kept = set(modules)
        with _scaled_off([(m, self.adapter) for name, m in self.unet.named_modules()
                          if name not in kept
                          and self.adapter in (getattr(m, "scaling", None) or {})]):
            yield

    def lora_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
            "target_modules": [f"attn2.{t}" for t in cfg.lora_targets],
            "init_lora_weights": True,
        }

    def result(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any] | None]:
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
                from forget_me_not.patch import reactivate

                reactivate(unet, self.active_before)
        with torch.no_grad():
            for name, original in self.originals.items():
                self.params[name].copy_(original.to(self.params[name].device))
        self.originals.clear()
        unet.train(self.was_training)
