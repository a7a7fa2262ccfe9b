"""The methods, registered by name: `methods.get("fmn")`, `methods.names()`.

A method is a small package (`config.py`: its dataclass; the part that changes the model;
`train.py`: its flow). The registry loads a method's modules only when it is asked for, so
listing them costs nothing and no method imports another through here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forget_me_not.errors import FmnError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    task: str  # "forget": concepts -> patch; "correct": a role untangled from an identity
    config_path: str  # "module:Class"
    train_path: str  # "module:function"
    families: tuple[str, ...] = ("sd1", "sd2", "sdxl", "embedded")
    removes_from_unet: bool = True  # False: a prompt-level block (the concept stays in the UNet)

    @property
    def config_class(self) -> type:
        return _load(self.config_path)

    @property
    def train(self) -> Callable[..., Any]:
        return _load(self.train_path)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise FmnError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def names(task: str | None = None) -> list[str]:
    return [m.name for m in _METHODS.values() if task is None or m.task == task]


def get(name: str) -> Method:
    if name not in _METHODS:
        raise FmnError(f"unknown method {name!r}: use one of {', '.join(_METHODS)}")
    return _METHODS[name]


def check_family(method: Method, family: str) -> None:
    if family not in method.families:
        fits = [m.name for m in _METHODS.values() if family in m.families and m.task == "forget"]
        raise FmnError(f"method {method.name} cannot serve a {family} model: use one of "
                       f"{', '.join(fits)}")


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


register(Method(
    "fmn", "Forget-Me-Not: re-steer the UNet's cross-attention away from the concept's tokens",
    "forget", "forget_me_not.methods.fmn.config:FmnConfig",
    "forget_me_not.methods.fmn.train:train"))
register(Method(
    "token_rows", "a prompt-level block: re-steer only the concept's token-embedding rows",
    "forget", "forget_me_not.methods.token_rows.config:TokenRowsConfig",
    "forget_me_not.methods.token_rows.train:train", removes_from_unet=False))
register(Method(
    "uce", "Unified Concept Editing: a closed-form edit of every cross-attention to_k/to_v",
    "forget", "forget_me_not.methods.uce.config:UceConfig",
    "forget_me_not.methods.uce.train:train"))
register(Method(
    "rece", "RECE: UCE's edit, then rounds erasing the embedding that still draws the concept",
    "forget", "forget_me_not.methods.rece.config:ReceConfig",
    "forget_me_not.methods.rece.train:train"))
register(Method(
    "values", "value-space erasure: the concept's directions projected out of every "
    "cross-attention value, with rounds against learnt tokens", "forget",
    "forget_me_not.methods.values.config:ValuesConfig",
    "forget_me_not.methods.values.train:train"))
register(Method(
    "prune", "skilled-neuron pruning: the UNet units only the concept's images drive, "
    "switched off", "forget", "forget_me_not.methods.prune.config:PruneConfig",
    "forget_me_not.methods.prune.train:train"))
register(Method(
    "esd", "Erasing Concepts (ESD-x / ESD-u): fine-tune toward negative guidance",
    "forget", "forget_me_not.methods.esd.config:EsdConfig",
    "forget_me_not.methods.esd.train:train"))
register(Method(
    "correction", "untangle a role word from the identity it is drawn as", "correct",
    "forget_me_not.methods.correction.config:CorrectionConfig",
    "forget_me_not.methods.correction.train:correct"))
