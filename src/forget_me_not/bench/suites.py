"""ConceptBench suites: YAML concept lists with prompt templates, judges and label sets.

A suite file looks like this (see conceptbench.yaml and world.yaml):

    name: world
    description: ...
    defaults: {n: 16, steps: 20, ...}          # evaluation settings tuned for the suite's model
    categories:
      object:
        judge: world                            # world | clip | nudenet
        templates: ["a photo of a {}", "a {}"]  # the category's prompt templates
        labels: [extra CLIP distractor labels]  # optional; the concepts' names are always labels
        concepts:
          - circle                              # a bare name, or a mapping:
          - {name: star, templates: [...], prompts: [...], judge: clip, images: [...], key: ...}
    held_out:                                   # optional: prompts for unseen combinations
      - {key: "circle @ striped", name: circle, category: object, templates: [...]}

Keys identify entries (default: the name); `prompts` are full prompts (I2P style) used for the
generation score instead of the templates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from forget_me_not.concepts import CATEGORIES, Concept
from forget_me_not.errors import FmnError

BUILTIN_SUITES = ("conceptbench", "world")
JUDGE_NAMES = ("world", "clip", "nudenet")
# Settings a suite may fix for its model; the CLI/runner arguments override them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "n": 32,  # samples per concept and phase
    "seed": 0,
    "steps": 25,  # denoising steps; None: the model folder's declared default
    "guidance": None,  # None: the model folder's declared default (else 7.5)
    "batch_size": 8,
    "inversion": "targets",  # all | targets | none
    "budget": 200,  # textual-inversion steps for I(c)
    "num_tokens": 1,
    "lr": None,
    "max_anchors": 8,
    "init_words": None,  # None (random), one string, or {category: words}
}
GROUPS = ("main", "held-out")


@dataclass(frozen=True)
class SuiteEntry:
    key: str
    concept: Concept
    judge: str
    group: str = "main"  # "main" or "held-out"
    prompts: tuple[str, ...] = ()  # full prompts for G; empty -> the concept's templates

    def generation_prompts(self) -> list[str]:
        return list(self.prompts) or self.concept.prompts()


@dataclass
class Suite:
    name: str
    description: str
    entries: list[SuiteEntry]
    labels: dict[str, list[str]]  # category -> CLIP label set
    defaults: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def entry(self, key: str) -> SuiteEntry:
        for e in self.entries:
            if e.key == key:
                return e
        raise FmnError(f"unknown concept '{key}' in suite '{self.name}'; valid: "
                       f"{', '.join(self.keys())}")

    def find(self, name: str) -> SuiteEntry | None:
        """The main entry whose key or concept name is `name` (case-insensitive), if any."""
        low = name.strip().lower()
        for e in self.entries:
            if e.key.lower() == low:
                return e
        for e in self.entries:
            if e.group == "main" and e.concept.name.lower() == low:
                return e
        return None

    def select(self, names: Iterable[str] | None) -> list[SuiteEntry]:
        """Entries by key or name; a name also brings its held-out entries. None -> all."""
        if names is None:
            return list(self.entries)
        wanted = [n.strip() for n in names if n.strip()]
        if not wanted:
            raise FmnError(f"no concept names given; valid: {', '.join(self.main_names())}")
        unknown = [n for n in wanted if self.find(n) is None]
        if unknown:
            raise FmnError(
                f"unknown concept{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in suite "
                f"'{self.name}'; valid: {', '.join(self.keys())}"
            )
        chosen: list[SuiteEntry] = []
        for n in wanted:
            e = self.find(n)
            assert e is not None
            extra = [e] if e.group != "main" else [e] + [
                h for h in self.entries if h.group != "main" and h.concept.name == e.concept.name]
            chosen += [x for x in extra if x not in chosen]
        return chosen

    def main_names(self) -> list[str]:
        return [e.key for e in self.entries if e.group == "main"]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """DEFAULT_SETTINGS < the suite's defaults < overrides that are not None."""
        out = {**DEFAULT_SETTINGS, **self.defaults}
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out


def suite_names() -> list[str]:
    return list(BUILTIN_SUITES)


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name ("conceptbench", "world") or a YAML file."""
    text_name = str(name_or_path)
    if text_name in BUILTIN_SUITES:
        ref = resources.files("forget_me_not.bench").joinpath(f"{text_name}.yaml")
        return parse_suite(yaml.safe_load(ref.read_text(encoding="utf-8")), path=None)
    path = Path(text_name).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        raise FmnError(f"unknown suite '{text_name}'; choose one of {', '.join(BUILTIN_SUITES)} "
                       "or pass a .yaml suite file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FmnError(f"suite file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    return parse_suite(data, path=path)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise FmnError(f"suite: {what} must be a list of strings, got {value!r}")
    return tuple(value)


def _entry(raw: Any, category: str, cat_cfg: Mapping[str, Any], group: str,
           where: str) -> SuiteEntry:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise FmnError(f"suite: {where}: each concept is a name or a mapping with 'name'")
    allowed = {"name", "key", "category", "templates", "prompts", "judge", "images"}
    extra = set(raw) - allowed
    if extra:
        raise FmnError(f"suite: {where}: unknown field(s) {', '.join(sorted(extra))}; "
                       f"allowed: {', '.join(sorted(allowed))}")
    category = raw.get("category", category)
    templates = _strings(raw.get("templates"), f"{where} templates") or _strings(
        cat_cfg.get("templates"), f"{category} templates")
    concept = Concept(str(raw["name"]), category, templates,
                      tuple(Path(p) for p in _strings(raw.get("images"), f"{where} images")))
    judge = raw.get("judge", cat_cfg.get("judge"))
    if judge not in JUDGE_NAMES:
        raise FmnError(f"suite: {where} ('{concept.name}'): judge must be one of "
                       f"{', '.join(JUDGE_NAMES)}, got {judge!r}")
    return SuiteEntry(str(raw.get("key", concept.name)), concept, judge, group,
                      _strings(raw.get("prompts"), f"{where} prompts"))


def parse_suite(data: Any, path: Path | None = None) -> Suite:
    where = str(path) if path else "suite"
    if not isinstance(data, Mapping) or not isinstance(data.get("categories"), Mapping):
        raise FmnError(f"{where}: a suite is a mapping with 'name' and 'categories'")
    defaults = dict(data.get("defaults") or {})
    unknown = set(defaults) - set(DEFAULT_SETTINGS)
    if unknown:
        raise FmnError(f"{where}: unknown defaults {', '.join(sorted(unknown))}; allowed: "
                       f"{', '.join(DEFAULT_SETTINGS)}")
    entries: list[SuiteEntry] = []
    labels: dict[str, list[str]] = {}
    categories = data["categories"]
    for category, cfg in categories.items():
        if category not in CATEGORIES:
            raise FmnError(f"{where}: unknown category '{category}'; use {', '.join(CATEGORIES)}")
        cfg = cfg or {}
        concepts = cfg.get("concepts") or []
        for i, raw in enumerate(concepts):
            entries.append(_entry(raw, category, cfg, "main", f"{category}[{i}]"))
        names = [e.concept.name for e in entries if e.concept.category == category]
        labels[category] = list(dict.fromkeys(names + list(_strings(cfg.get("labels"),
                                                                      f"{category} labels"))))
    for i, raw in enumerate(data.get("held_out") or []):
        if not isinstance(raw, Mapping) or "category" not in raw or "key" not in raw:
            raise FmnError(f"{where}: held_out[{i}] needs 'key', 'name' and 'category'")
        cfg = categories.get(raw["category"]) or {}
        entries.append(_entry(raw, raw["category"], cfg, "held-out", f"held_out[{i}]"))
    keys = [e.key for e in entries]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise FmnError(f"{where}: concept keys repeat: {', '.join(dupes)}; give each a unique key")
    if not entries:
        raise FmnError(f"{where}: the suite lists no concepts")
    return Suite(str(data.get("name", path.stem if path else "suite")),
                 str(data.get("description", "")), entries, labels, defaults, path)
