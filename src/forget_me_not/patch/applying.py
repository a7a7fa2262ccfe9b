"""Putting a patch on a pipeline and taking it off: peft adapters, weight deltas, token rows.

Every applied patch has an entry in a registry on the UNet (name -> state, in application
order), so several stack and each comes off exactly, whatever the order.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from forget_me_not.errors import FmnError
from forget_me_not.patch.keys import REGISTRY_ATTR


def token_table(pipe: Any, encoder: str, patch_name: str) -> torch.Tensor:
    """The token-embedding weight (vocab, dim) of the pipeline's `encoder`."""
    module = getattr(pipe, encoder, None)
    if module is None:
        raise FmnError(
            f"patch {patch_name!r} changes {encoder}, which this pipeline does not have: apply "
            "it to the model it was made for"
        )
    return module.get_input_embeddings().weight


def add_rows(tables: dict[str, torch.Tensor], patch: Any,
              strength: float) -> dict[str, torch.Tensor]:
    """Add the patch's row deltas to the token tables `check_fit` returned for it; returns the
    rows as they were, per encoder."""
    rows = patch.token_rows()
    before: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for enc, (ids, delta) in rows.items():
            table, index = tables[enc], ids.to(tables[enc].device)
            before[enc] = table[index].detach().to("cpu", copy=True)
            moved = table[index].float() + delta.to(table.device, torch.float32) * strength
            table[index] = moved.to(table.dtype)
    return before


def check_fit(pipe: Any, patch: Any) -> dict[str, torch.Tensor]:
    """The token tables the patch's rows go into, once each row is checked to fit."""
    rows = patch.token_rows()
    tables = {enc: token_table(pipe, enc, patch.name) for enc in rows}
    for enc, (ids, delta) in rows.items():
        check_rows(tables[enc], ids, delta, enc, patch.name)
    return tables


def check_rows(table: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor, encoder: str,
                patch_name: str) -> None:
    if ids.unique().numel() != ids.numel():
        raise FmnError(f"patch {patch_name!r} is damaged: {encoder} lists a token twice; make "
                       "it again")
    if delta.shape[1] != table.shape[1] or int(ids.max()) >= table.shape[0] or int(ids.min()) < 0:
        raise FmnError(
            f"patch {patch_name!r} does not fit this {encoder} (rows of width {delta.shape[1]} "
            f"for tokens up to {int(ids.max())}; the model has {table.shape[0]} tokens of width "
            f"{table.shape[1]}): apply it to the model it was made for"
        )


def applied_registry(unet: Any) -> dict[str, dict[str, Any]]:
    registry = getattr(unet, REGISTRY_ATTR, None)
    if registry is None:
        registry = {}
        object.__setattr__(unet, REGISTRY_ATTR, registry)
    return registry


def drop_adapter(unet: Any, name: str, active: list[str]) -> None:
    """Delete adapter `name`; unwrap the peft layers when none is left, else reactivate."""
    unet.delete_adapters(name)
    if not getattr(unet, "peft_config", None):
        # No adapter left: unwrap the peft layers so the UNet is the base model again.
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(unet)
        unet._hf_peft_config_loaded = None
    else:
        activate(unet, [n for n in active if n != name])


def active_adapters(unet: Any) -> list[str]:
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    return list(unet.active_adapters())


def activate(unet: Any, others: list[str]) -> None:
    """Make every applied LoRA patch active at its scale, plus adapters active before (at 1.0)."""
    registry = applied_registry(unet)
    ours = [n for n, e in registry.items() if e["kind"] == "lora"]
    names = [n for n in others if n not in registry] + ours
    weights = [registry[n]["scale"] if n in registry else 1.0 for n in names]
    if names:
        unet.set_adapters(names, weights)


def unet_param(unet: Any, name: str) -> torch.nn.Parameter:
    """A UNet parameter by name, also when a peft layer wraps its module (".base_layer.")."""
    try:
        return unet.get_parameter(name)
    except AttributeError:
        module, _, leaf = name.rpartition(".")
        try:
            return unet.get_parameter(f"{module}.base_layer.{leaf}")
        except AttributeError as e:
            raise FmnError(
                f"this UNet has no weight {name}: apply the patch to the model it was made for"
            ) from e



def apply_lora(patch: Any, unet: Any, scale: float) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    before = active_adapters(unet)
    try:
        with warnings.catch_warnings():
            # peft warns whenever a second adapter is added: stacking is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(LoraConfig(**patch.lora_config), adapter_name=patch.name)
    except ValueError as e:  # peft: no module matches the targets
        raise FmnError(
            f"patch {patch.name!r} targets modules this UNet does not have ({e}): apply it "
            "to the model it was made for"
        ) from e
    state = {k.removeprefix("unet."): v for k, v in patch.tensors.items()}
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=patch.name)
    except RuntimeError as e:  # shape mismatch: made for other layer sizes
        drop_adapter(unet, patch.name, before)
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise FmnError(
            f"patch {patch.name!r} does not fit this UNet ({first[:160]}): apply it to the "
            "model it was made for"
        ) from e
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        drop_adapter(unet, patch.name, before)
        raise FmnError(
            f"patch {patch.name!r} does not fit this UNet ({len(unexpected)} unknown "
            f"weights, e.g. {unexpected[0]}): apply it to the model it was made for"
        )
    applied_registry(unet)[patch.name] = {"kind": "lora", "scale": float(scale)}
    activate(unet, before)

def remove_lora(patch: Any, unet: Any) -> None:
    before = [n for n in active_adapters(unet) if n != patch.name]
    applied_registry(unet).pop(patch.name)
    drop_adapter(unet, patch.name, before)

def apply_delta(patch: Any, unet: Any, scale: float) -> None:
    stash: dict[str, torch.Tensor] = {}
    params = [(unet_param(unet, k.removeprefix("unet.")), k) for k in patch.unet_tensors]
    for p, key in params:
        if tuple(p.shape) != tuple(patch.tensors[key].shape):
            raise FmnError(
                f"patch {patch.name!r} does not fit this UNet ({key}: patch "
                f"{tuple(patch.tensors[key].shape)}, model {tuple(p.shape)}): apply it to the "
                "model it was made for"
            )
    with torch.no_grad():
        for p, key in params:
            stash[key] = p.detach().to("cpu", copy=True)
        for p, key in params:
            p.add_(patch.tensors[key].to(p.device, torch.float32).mul(scale).to(p.dtype))
    applied_registry(unet)[patch.name] = {"kind": "delta", "scale": float(scale), "stash": stash}

def remove_delta(patch: Any, unet: Any) -> None:
    registry = applied_registry(unet)
    names = list(registry)
    later = [registry[n] for n in names[names.index(patch.name) + 1 :]
             if registry[n]["kind"] == "delta"]
    entry = registry.pop(patch.name)
    with torch.no_grad():
        for key, original in entry["stash"].items():
            p = unet_param(unet, key.removeprefix("unet."))
            touched_later = any(key in e["stash"] for e in later)
            if not touched_later:
                p.copy_(original.to(p.device))  # exact: the weights as they were
                continue
            # Another delta patch went on after this one: take ours out arithmetically and
            # fix what that patch will restore.
            delta = patch.tensors[key].to(torch.float32) * entry["scale"]
            p.sub_(delta.to(p.device, p.dtype))
            for e in later:
                if key in e["stash"]:
                    e["stash"][key] = (e["stash"][key].float() - delta).to(
                        e["stash"][key].dtype)

def remove_rows(patch: Any, pipe: Any) -> None:
    """Put the token rows back (the registry entry stays: the UNet half comes off next)."""
    registry = applied_registry(pipe.unet)
    names = list(registry)
    later = [registry[n] for n in names[names.index(patch.name) + 1 :]
             if "patch_ids" in registry[n]]
    entry = registry[patch.name]
    with torch.no_grad():
        for enc, (ids, delta) in patch.token_rows().items():
            table = token_table(pipe, enc, patch.name)
            index = ids.to(table.device)
            shared = [e for e in later if enc in e["patch_ids"]
                      and bool(torch.isin(ids, e["patch_ids"][enc]).any())]
            if not shared:
                table[index] = entry["row_stash"][enc].to(table.device)  # exact
                continue
            # A later patch changed some of the same rows: take ours out
            # arithmetically and fix what that patch will restore.
            change = delta.float() * entry["scale"]
            table[index] = (table[index].float() - change.to(table.device)).to(table.dtype)
            for e in shared:
                their = e["patch_ids"][enc]
                for row, token in enumerate(ids.tolist()):
                    hit = (their == token).nonzero().flatten()
                    if hit.numel():
                        old = e["row_stash"][enc][hit[0]]
                        e["row_stash"][enc][hit[0]] = (old.float() - change[row]).to(
                            old.dtype)



def reactivate(unet: Any, names: list[str]) -> None:
    """Switch the named applied LoRA patches back on at the scales they were applied with."""
    registry = applied_registry(unet)
    unet.set_adapters(names, [registry.get(n, {}).get("scale", 1.0) for n in names])
