"""Recipes: a method's settings as data, one YAML file per use (`recipes/*.yaml`).

A recipe names its method(s) and sets their config fields; every value says where it comes
from in a comment beside it. A recipe has one part or several, each trained on the base model
and kept together in one patch (a part may name another recipe and scale it). `families.yaml`
names each model family's default recipe, per method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from forget_me_not import methods
from forget_me_not.errors import FmnError
from forget_me_not.settings import build, check_number, parse_pair

HERE = Path(__file__).parent
RECIPE_KEYS = ("description", "families", "needs_images", "separately", "sequential",
               "inversion", "parts", "departs")
PART_KEYS = ("method", "recipe", "config", "anchored", "scale", "only")
# `only`: the concepts a part trains on; "" (every one), or those that name an anchor or not.
ONLY = ("", "anchored", "plain")
INVERSION_KEYS = ("num_tokens", "init", "init_sigma", "lr", "steps", "weight_decay",
                  "norm_target", "flip_p")


@dataclass(frozen=True)
class Part:
    method: str
    config: Any  # the method's config dataclass, validated
    anchored: dict[str, Any]  # overrides for runs where a concept names an anchor
    scale: float = 1.0  # the share of its trained size the part keeps in the patch
    source: str = ""
    only: str = ""  # "anchored" / "plain": the part trains on those concepts alone

    def takes(self, concept: Any) -> bool:
        """Whether this part trains on `concept` (by whether it names an anchor)."""
        return not self.only or (self.only == "anchored") == bool(concept.anchor)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    parts: tuple[Part, ...]
    families: tuple[str, ...] = ()  # () = written for any family
    needs_images: bool = False
    separately: bool = False  # several concepts: one run each, patches stacked
    sequential: bool = False  # each part trains on the model with the parts before it applied
    inversion: dict[str, Any] | None = None  # the textual-inversion first stage, with images
    departs: str = ""  # how it departs from the official recipe, and why
    path: str = ""

    def check_family(self, family: str) -> None:
        if self.families and family not in self.families:
            hint = " (use paper-lora)" if self.name == "paper" else ""
            raise FmnError(f"recipe {self.name} was written for {'/'.join(self.families)} "
                           f"models, not {family}{hint}: choose another --recipe (see "
                           "`fmn recipes`)")

    def configs(self, anchored: bool, sets: list[str] = ()) -> list[Any]:
        """Each part's config: with its anchored overrides when a concept names an anchor,
        then `sets` ("KEY=VALUE" for every part that has KEY, "METHOD.KEY=VALUE" for one)."""
        out = []
        for part in self.parts:
            values = {f.name: getattr(part.config, f.name)
                      for f in dataclasses.fields(part.config)}
            # a part for one kind of concept knows whether its concepts name an anchor
            if (part.only == "anchored") if part.only else anchored:
                values.update(part.anchored)
            out.append((part, values))
        for pair in sets:
            key, value = parse_pair(pair)
            target, _, field = key.rpartition(".")
            hits = [values for part, values in out if (not target or target == part.method)
                    and field in values]
            if not hits:
                valid = sorted({k for _, values in out for k in values})
                raise FmnError(f"--set {key}: no part of recipe {self.name} has that key; "
                               f"valid keys: {', '.join(valid)}")
            for values in hits:
                values[field] = value
        return [build(type(part.config), values, f"recipe {self.name}") for part, values in out]


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml") if p.stem != "families")


def default_for(family: str, method: str | None = None) -> str | None:
    """The family's recipe for `method` (None: the family's default), or None if it has none."""
    table = yaml.safe_load((HERE / "families.yaml").read_text())
    return (table.get(family) or {}).get(method or "default")


def load(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name, or a YAML file; every key and value checked."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if str(name_or_path) not in names():
            raise FmnError(f"unknown recipe {name_or_path!r}: use one of {', '.join(names())}, "
                           "or a .yaml file")
        path = HERE / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FmnError(f"recipe file {path} does not exist: pass a shipped name or a .yaml file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise FmnError(f"recipe file {path}: key {err.key!r} appears twice (line {err.line}): "
                       "keep one (YAML would silently use the last)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FmnError(f"recipe file {path} is not valid YAML ({str(err).splitlines()[0]})") \
            from None
    return _parse(data, path)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (two `parts:`, two `lr:`)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def from_method(method: str) -> Recipe:
    """A one-part recipe with the method's own defaults (for a family without a recipe)."""
    spec = methods.get(method)
    return Recipe(f"{method}-defaults", f"{method} with its config's defaults",
                  (Part(method, spec.config_class(), {}),))


def _parse(data: Any, path: Path) -> Recipe:
    where = str(path)
    if not isinstance(data, dict):
        raise FmnError(f"{where}: a recipe is a mapping with 'parts'")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise FmnError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(RECIPE_KEYS)}")
    raw_parts = data.get("parts")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise FmnError(f"{where}: 'parts' must be a non-empty list of {{method, config}}")
    parts = tuple(_part(p, f"{where}: parts[{i}]") for i, p in enumerate(raw_parts))
    families = data.get("families") or []
    if not isinstance(families, list) or any(f not in ("sd1", "sd2", "sdxl", "embedded")
                                             for f in families):
        raise FmnError(f"{where}: families must be a list of sd1, sd2, sdxl, embedded")
    inversion = data.get("inversion")
    if inversion is not None:
        if not isinstance(inversion, dict) or any(k not in INVERSION_KEYS for k in inversion):
            raise FmnError(f"{where}: inversion takes {', '.join(INVERSION_KEYS)}")
    for key in ("needs_images", "separately", "sequential"):
        if not isinstance(data.get(key, False), bool):
            raise FmnError(f"{where}: {key} must be true or false")
    sequential = bool(data.get("sequential", False))
    if sequential:
        _check_sequential(parts, where)
        if any(part.only for part in parts):
            raise FmnError(f"{where}: a sequential recipe trains every part on every concept; "
                           "drop 'only' or 'sequential'")
    return Recipe(path.stem, str(data.get("description", "")), parts, tuple(families),
                  bool(data.get("needs_images", False)), bool(data.get("separately", False)),
                  sequential, inversion, str(data.get("departs", "")), where)


def _check_sequential(parts: tuple[Part, ...], where: str) -> None:
    """A later part trains beside the earlier parts' adapters and compares with the model
    without them, so it must be a LoRA that can (fmn, train: lora) and there must be two."""
    if len(parts) < 2:
        raise FmnError(f"{where}: sequential needs at least two parts")
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(part.config, "compare_without") or \
                getattr(part.config, "train", None) != "lora":
            raise FmnError(f"{where}: parts[{i}] follows earlier parts (sequential), which only "
                           "an fmn part with train: lora can; reorder the parts or drop "
                           "sequential")


def _part(raw: Any, where: str) -> Part:
    if not isinstance(raw, dict) or any(k not in PART_KEYS for k in raw):
        raise FmnError(f"{where}: a part takes {', '.join(PART_KEYS)}")
    scale = raw.get("scale", 1.0)
    check_number(f"{where}: scale", scale, strict=True, high=1.0)
    only = raw.get("only", "")
    if only not in ONLY:
        raise FmnError(f"{where}: only must be 'anchored' (concepts that name an anchor, e.g. "
                       f"a style) or 'plain' (the others), not {only!r}")
    if "recipe" in raw:  # another recipe's single part, perhaps scaled or with some changes
        other = load(raw["recipe"])
        if len(other.parts) != 1 or set(raw) - {"recipe", "scale", "only", "config"}:
            raise FmnError(f"{where}: a part naming a recipe takes only 'scale', 'only' and "
                           "'config' (changes to its settings), and that recipe must have one "
                           "part")
        base = other.parts[0]
        config = base.config
        if raw.get("config"):
            fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            config = build(type(config), {**fields, **raw["config"]}, f"{where}.config")
        return dataclasses.replace(base, config=config, scale=float(scale), source=other.path,
                                   only=only)
    if "method" not in raw:
        raise FmnError(f"{where}: a part names a method ({', '.join(methods.names())}) or a "
                       "recipe")
    try:
        spec = methods.get(raw["method"])
    except FmnError as err:
        raise FmnError(f"{where}: {err}") from None
    config = build(spec.config_class, raw.get("config") or {}, f"{where}.config")
    anchored = raw.get("anchored") or {}
    build(spec.config_class, {**(raw.get("config") or {}), **anchored}, f"{where}.anchored")
    return Part(spec.name, config, dict(anchored), float(scale), where, only)
