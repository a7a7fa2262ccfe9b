"""G, I, M-Score and retention on a tiny SD1 pipeline with fake judges, patches and inversion."""

from __future__ import annotations

import numpy as np
import pytest

import forget_me_not.evaluate as ev
from forget_me_not.concepts import Concept
from forget_me_not.errors import FmnError
from forget_me_not.judges.base import BaseJudge
from tiny_pipelines import make_tiny_pipeline

FAST = dict(steps=2, batch_size=2)


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline("sd1")


class BrightnessJudge(BaseJudge):
    """Deterministic: P = mean pixel value (so it depends on every pixel of the image)."""

    name = "bright"

    def probabilities(self, images, concept):
        return np.array([np.asarray(i, dtype=np.float64).mean() / 255 for i in images])


class SwitchJudge(BaseJudge):
    """P = table[concept][patched?], so the bookkeeping can be checked exactly."""

    name = "switch"

    def __init__(self, table, state):
        super().__init__()
        self.table, self.state = table, state

    def supports(self, concept):
        return concept.name in self.table

    def why_not(self, concept):
        return None if concept.name in self.table else f"switch judge cannot score {concept.name}"

    def probabilities(self, images, concept):
        phase = "after" if self.state["patched"] else "before"
        return np.full(len(images), self.table[concept.name][phase])


class FakePatch:
    def __init__(self, state, concepts):
        self.state, self.metadata = state, {"concepts": [{"name": c} for c in concepts]}
        self.log = []

    def apply(self, pipe):
        self.state["patched"] = True
        self.log.append("apply")

    def remove(self, pipe):
        self.state["patched"] = False
        self.log.append("remove")


class FakeEmbedding:
    """Adds one placeholder token to the pipeline, as textual inversion does."""

    def load_into(self, pipe):
        pipe.tokenizer.add_tokens(["<inv0>"])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        return "<inv0>"


@pytest.fixture
def fake_invert(monkeypatch):
    calls = []

    def invert(pipe, anchors, settings, progress):
        calls.append((len(anchors), settings))
        pipe.tokenizer.add_tokens(["<tmp>"])  # a sloppy inverter leaves tokens behind
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        pipe.text_encoder.requires_grad_(True)
        return FakeEmbedding()

    monkeypatch.setattr(ev, "_invert", invert)
    return calls


def test_sample_plan_cycles_templates_and_fixes_seeds():
    prompts, seeds = ev.sample_plan(["a {0}", "b", "c"], 5, 10)
    assert prompts == ["a {0}", "b", "c", "a {0}", "b"]
    assert seeds == [10, 11, 12, 13, 14]


def test_generation_score_is_deterministic_and_batch_invariant(pipe):
    concept = Concept("star", "object", ("a photo of a {}", "a {}"))
    g1 = ev.generation_score(pipe, concept, BrightnessJudge(), n=3, seed=5, **FAST)
    g2 = ev.generation_score(pipe, concept, BrightnessJudge(), n=3, seed=5, steps=2,
                             batch_size=3)
    assert g1.prompts == ["a photo of a star", "a star", "a photo of a star"]
    assert g1.seeds == [5, 6, 7] and len(g1.images) == 3
    # Another batch split changes float rounding only (a pixel may move by one level).
    np.testing.assert_allclose(g1.probabilities, g2.probabilities, atol=1e-4)
    assert g1.rate == float(np.mean(g1.probabilities >= 0.5))
    again = ev.generation_score(pipe, concept, BrightnessJudge(), n=2, seed=5, **FAST)
    np.testing.assert_array_equal(again.probabilities, g1.probabilities[:2])


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "samples must be positive"),
    ({"n": -3}, "samples must be positive"),
    ({"steps": 0}, "steps must be positive"),
    ({"batch_size": 0}, "batch size"),
])
def test_generation_settings_refuse_bad_counts(pipe, kwargs, message):
    with pytest.raises(FmnError, match=message):
        ev.generation_score(pipe, Concept("star"), BrightnessJudge(), **{**FAST, **kwargs})


def test_inversion_score_uses_the_token_and_restores_the_pipeline(pipe, fake_invert):
    pipe.text_encoder.requires_grad_(False)  # the fake inverter turns it on
    n_tokens = len(pipe.tokenizer)
    n_rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    anchors = ev.generation_score(pipe, Concept("star"), BrightnessJudge(), n=2, **FAST).images
    score = ev.inversion_score(pipe, Concept("star", "object", ("a photo of a {}",)),
                               BrightnessJudge(), anchors, budget=3, n=2, **FAST)
    assert score.phrase == "<inv0>"
    assert score.prompts == ["a photo of a <inv0>"] * 2
    assert score.n_anchors == 2 and score.budget == 3
    assert fake_invert[0][1].budget == 3
    assert len(pipe.tokenizer) == n_tokens
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == n_rows
    assert pipe.text_encoder.get_input_embeddings().weight.equal(weight)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_m_score_is_the_max_of_both_parts(pipe, fake_invert):
    m = ev.m_score(pipe, Concept("star"), BrightnessJudge(), n=2, budget=2, **FAST)
    assert m.i is not None and m.m == max(m.g.rate, m.i.rate)
    assert m.to_dict()["m"] == m.m
    no_inv = ev.m_score(pipe, Concept("star"), BrightnessJudge(), n=2, inversion=False, **FAST)
    assert no_inv.i is None and no_inv.m == no_inv.g.rate and no_inv.m_from == "g"


def test_evaluate_suite_before_after_targets_and_retention(pipe, fake_invert):
    state = {"patched": False}
    table = {
        "star": {"before": 0.9, "after": 0.1},  # the target: forgotten
        "moon": {"before": 0.9, "after": 0.9},  # kept
        "milka": {"before": 0.8, "after": 0.2},  # collateral damage
        "zorbo": {"before": 0.1, "after": 0.9},  # never drawn: retention undefined
    }
    judge = SwitchJudge(table, state)
    patch = FakePatch(state, ["star"])
    concepts = [Concept("star"), Concept("moon"), Concept("milka", "id"), Concept("zorbo", "id")]
    result = ev.evaluate_suite(pipe, [patch], concepts, judge, n=2, budget=2, progress=False,
                               **FAST)
    assert patch.log == ["apply", "remove"] and not state["patched"]
    by = {c.key: c for c in result.concepts}
    assert result.targets == ["star"]
    star = by["star"]
    assert star.target and star.before.g.rate == 1.0 and star.after.g.rate == 0.0
    assert star.before.i is not None and star.after.i is not None  # inversion on targets
    assert star.after.i.rate == 0.0 and star.after.m == 0.0 and star.retention is None
    assert by["moon"].retention == 1.0 and by["moon"].before.i is None
    assert by["milka"].retention == 0.0
    assert by["zorbo"].retention is None
    assert len(fake_invert) == 2  # before and after, with the same base anchors
    summary = result.summary()
    assert summary["target_m_before"] == 1.0 and summary["target_m_after"] == 0.0
    assert summary["mean_retention"] == 0.5 and summary["min_retention"] == 0.0
    data = result.to_dict()
    assert data["concepts"][0]["after"]["generation"]["seeds"] == [0, 1]


def test_evaluate_suite_without_patches_and_errors(pipe):
    state = {"patched": False}
    judge = SwitchJudge({"star": {"before": 1.0, "after": 0.0}}, state)
    result = ev.evaluate_suite(pipe, [], [Concept("star")], judge, n=1, inversion="none",
                               progress=False, **FAST)
    assert result.concepts[0].after is None and result.concepts[0].retention is None
    with pytest.raises(FmnError, match="unknown inversion scope"):
        ev.evaluate_suite(pipe, [], [Concept("star")], judge, inversion="some", **FAST)
    with pytest.raises(FmnError, match="cannot score moon"):
        ev.evaluate_suite(pipe, [], [Concept("moon")], judge, **FAST)
    with pytest.raises(FmnError, match="repeat"):
        ev.evaluate_suite(pipe, [], [Concept("star"), Concept("star")], judge, **FAST)
    with pytest.raises(FmnError, match="no concepts"):
        ev.evaluate_suite(pipe, [], [], judge, **FAST)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_inversion_leaves_the_pipeline_unchanged(family):
    """The real textual inversion (2 steps) on tiny pipelines, one and two text encoders."""
    pipe = make_tiny_pipeline(family)
    sizes = [len(pipe.tokenizer)] + ([len(pipe.tokenizer_2)] if family == "sdxl" else [])
    m = ev.m_score(pipe, Concept("star"), BrightnessJudge(), n=1, steps=1, batch_size=1,
                   budget=2)
    assert m.i is not None and m.i.phrase and m.i.phrase in m.i.prompts[0]
    assert m.i.n_anchors == 1
    after = [len(pipe.tokenizer)] + ([len(pipe.tokenizer_2)] if family == "sdxl" else [])
    assert after == sizes
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == sizes[0]
