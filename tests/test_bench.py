"""ConceptBench: the shipped suites, selection and errors, the runner and its report."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import yaml

import forget_me_not.evaluate as ev
from forget_me_not.bench import load_suite, parse_suite, run_bench, suite_names
from forget_me_not.errors import FmnError
from forget_me_not.judges.base import BaseJudge
from forget_me_not.report import check_out_dir
from tiny_pipelines import make_tiny_pipeline

IMAGENETTE = ["tench", "english springer", "cassette player", "chain saw", "church",
              "french horn", "garbage truck", "gas pump", "golf ball", "parachute"]


def test_conceptbench_has_the_required_concepts():
    suite = load_suite("conceptbench")
    by_cat: dict[str, list[str]] = {}
    for e in suite.entries:
        by_cat.setdefault(e.concept.category, []).append(e.concept.name)
    assert len(by_cat["id"]) >= 20 and len(by_cat["object"]) >= 20
    assert len(by_cat["style"]) >= 20 and len(by_cat["nsfw"]) >= 2
    assert set(IMAGENETTE) <= set(by_cat["object"])
    judges = {e.key: e.judge for e in suite.entries}
    assert judges["nudity"] == "nudenet" and judges["van gogh"] == "clip"
    assert all(judges[k] == "clip" for k in by_cat["id"] + by_cat["object"] + by_cat["style"])
    assert suite.entry("nudity").prompts  # the shipped I2P-style prompt list
    for cat in ("id", "object", "style"):
        assert len(suite.labels[cat]) > len(by_cat[cat])  # concepts plus distractors


def test_world_suite_lists_every_world_concept_and_the_held_out_pairs():
    vocab = pytest.importorskip("forget_me_not.world.vocab")
    captions = pytest.importorskip("forget_me_not.world.captions")
    suite = load_suite("world")
    main = {e.concept.name: e for e in suite.entries if e.group == "main"}
    expected = set(vocab.OBJECTS + vocab.UNSAFE_OBJECTS + vocab.STYLES + vocab.IDS) | {vocab.ROLE}
    assert set(main) == expected
    assert all(main[u].concept.category == "nsfw" for u in vocab.UNSAFE_OBJECTS)
    assert all(e.judge == "world" for e in suite.entries)
    held = {(e.concept.name, re.search(r"in (\w+) style", e.concept.templates[0]).group(1))
            for e in suite.entries if e.group == "held-out"}
    assert held == set(captions.HELD_OUT)
    assert not set(vocab.COLOURS) & set(main)  # colours are attributes, not concepts


def test_select_and_unknown_names():
    suite = load_suite("world")
    keys = [e.key for e in suite.select(["star"])]
    assert keys[0] == "star" and all(k.startswith("star") for k in keys) and len(keys) == 2
    assert [e.key for e in suite.select(["star @ outlined"])] == ["star @ outlined"]
    with pytest.raises(FmnError, match=r"unknown concept pony in suite 'world'; valid: .*circle"):
        suite.select(["pony"])
    with pytest.raises(FmnError, match="unknown suite 'nope'.*conceptbench, world"):
        load_suite("nope")
    assert suite_names() == ["conceptbench", "world"]


@pytest.mark.parametrize("data, message", [
    ({"name": "x"}, "mapping with 'name' and 'categories'"),
    ({"categories": {"colour": {"judge": "world", "concepts": ["red"]}}}, "unknown category"),
    ({"categories": {"object": {"judge": "eye", "concepts": ["star"]}}}, "judge must be one of"),
    ({"categories": {"object": {"judge": "world", "concepts": ["star", "star"]}}}, "repeat"),
    ({"categories": {"object": {"judge": "world", "concepts": [{"name": "a", "size": 3}]}}},
     "unknown field"),
    ({"defaults": {"speed": 3}, "categories": {"object": {"judge": "world", "concepts": ["a"]}}},
     "unknown defaults"),
    ({"categories": {"object": {"judge": "world", "templates": ["no slot"],
                                "concepts": ["a"]}}}, "must contain"),
])
def test_parse_suite_errors(data, message):
    with pytest.raises(FmnError, match=message):
        parse_suite(data)


def test_suite_file_and_settings(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "defaults": {"n": 3},
                                    "categories": {"object": {"judge": "clip",
                                                              "concepts": ["dog", "cat"]}}}))
    suite = load_suite(path)
    assert suite.keys() == ["dog", "cat"] and suite.labels["object"] == ["dog", "cat"]
    assert suite.settings(n=None, steps=4)["n"] == 3 and suite.settings(steps=4)["steps"] == 4


def test_check_out_dir(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FmnError, match="not empty; pass --overwrite"):
        check_out_dir(tmp_path / "full")
    check_out_dir(tmp_path / "full", overwrite=True)
    with pytest.raises(FmnError, match="does not exist"):
        check_out_dir(tmp_path / "no" / "out")


class NameJudge(BaseJudge):
    """P depends on the concept and on whether the fake patch is applied."""

    name = "fake"

    def __init__(self, state):
        super().__init__()
        self.state = state

    def probabilities(self, images, concept):
        patched = self.state["patched"]
        if patched and concept.name == "star":  # forgotten
            return np.full(len(images), 0.1)
        if patched and concept.name == "moon":  # collateral damage: half its samples lost
            return np.array([0.9 if i % 2 else 0.1 for i in range(len(images))])
        return np.full(len(images), 0.9)


class FakePatch:
    def __init__(self, state):
        self.state, self.metadata = state, {"concepts": [{"name": "star"}], "family": "sd1"}

    def apply(self, pipe):
        self.state["patched"] = True

    def remove(self, pipe):
        self.state["patched"] = False


@pytest.fixture
def fake_invert(monkeypatch):
    class Emb:
        def load_into(self, pipe):
            return "star"  # generating from the word itself stands in for a learned token

    monkeypatch.setattr(ev, "_invert", lambda pipe, anchors, settings, progress: Emb())


def test_run_bench_writes_the_full_report(tmp_path, fake_invert):
    state = {"patched": False}
    out = tmp_path / "report"
    pipe = make_tiny_pipeline("sd1")
    result = run_bench(pipe, "world", ["star", "moon", "milka"], [FakePatch(state)], out,
                       judge=NameJudge(state), n=2, steps=2, batch_size=2, progress=False)
    assert not state["patched"]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "results.csv", "report.md", "report.html", "plots/mscore.png",
            "plots/retention.png"} <= names
    assert sum(n.startswith("images/") for n in names) == 6  # 3 concepts + their held-out pairs
    data = json.loads((out / "results.json").read_text())
    rows = {c["key"]: c for c in data["concepts"]}
    star = rows["star"]
    assert star["target"] and star["before"]["g"] == 1.0 and star["after"]["g"] == 0.0
    assert star["after"]["i"] == 0.0 and star["after"]["m"] == 0.0
    assert star["before"]["inversion"]["phrase"] == "star"
    assert rows["star @ outlined"]["after"]["i"] is None  # one inversion per concept
    assert rows["moon"]["retention"] == 0.5 and rows["milka"]["retention"] == 1.0
    assert data["summary"]["targets"] == ["star"] and data["meta"]["suite"] == "world"
    html = (out / "report.html").read_text()
    for rel in re.findall(r"src='([^']+)'", html):
        assert (out / rel).is_file()
    assert "retention" in html and "star" in html
    md = (out / "report.md").read_text()
    assert "| star | object | main | yes | 100.0% |" in md
    with open(out / "results.csv") as f:
        csv_rows = {r["key"]: r for r in csv.DictReader(f)}
    assert csv_rows["moon"]["retention"] == "0.5"
    assert result.summary()["mean_retention"] == pytest.approx(0.75)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders

    # a second run refuses the full folder before doing any work, and --overwrite replaces it
    with pytest.raises(FmnError, match="not empty"):
        run_bench(pipe, "world", ["star"], [], out, judge=NameJudge(state), n=1, steps=1)
    run_bench(pipe, "world", ["milka"], [], out, overwrite=True, judge=NameJudge(state), n=1,
              steps=1, progress=False)
    data = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in data["concepts"]] == ["milka", "milka @ dotted"]
    assert not (out / "plots/retention.png").exists()


def test_run_bench_bad_input_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FmnError, match="samples must be positive"):
        run_bench("embedded", "world", ["star"], [], out, n=0)
    with pytest.raises(FmnError, match="unknown concept"):
        run_bench("embedded", "world", ["pony"], [], out)
    with pytest.raises(FmnError, match="patch file .* does not exist"):
        run_bench("embedded", "world", ["star"], [tmp_path / "p.safetensors"], out)
    with pytest.raises(FmnError, match="NudeNet judge only scores nudity"):
        run_bench("embedded", "world", ["milka"], [], out, judge="nudenet")
    with pytest.raises(FmnError, match="cannot load CLIP model .* loading failed"):
        run_bench("embedded", "world", ["milka"], [], out, judge="clip",
                  judge_model=str(tmp_path))
    assert not out.exists()


class BrightnessJudge(BaseJudge):
    name = "bright"

    def probabilities(self, images, concept):
        return np.array([np.asarray(i, dtype=np.float64).mean() / 255 for i in images])


def test_run_bench_with_a_real_patch_file(tmp_path):
    """A patch from the real re-steering (2 steps) goes through load_patch/apply/remove."""
    from forget_me_not.api import forget
    from forget_me_not.concepts import Concept
    from tiny_pipelines import fmn_config

    pipe = make_tiny_pipeline("sd1")
    config = fmn_config(steps=2, reference="noise", lr=1e-1)
    patch_path = tmp_path / "star.safetensors"
    forget(pipe, [Concept("star")], config, progress=False).save(patch_path)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = run_bench(pipe, "world", ["star", "moon"], [patch_path], tmp_path / "out",
                       judge=BrightnessJudge(), n=2, steps=2, batch_size=2, budget=2,
                       progress=False)
    assert result.targets == ["star"]
    by = {c.key: c for c in result.concepts}
    assert by["star"].after.i is not None and by["moon"].after.i is None
    assert by["star"].retention is None and by["moon"].after is not None
    for k, v in pipe.unet.state_dict().items():  # the patch was removed again
        assert k in weights and v.equal(weights[k]), k
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert str(patch_path) in data["meta"]["patches"]
