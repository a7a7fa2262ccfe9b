"""`fmn eval` and `fmn bench`: bad input is one line, exit 2, nothing written; real tiny runs."""

from __future__ import annotations

import builtins
import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import forget_me_not.bench.runner as runner
from forget_me_not.cli.main import app
from forget_me_not.concepts import Concept
from forget_me_not.evaluate import ConceptResult, MScore, RecognitionScore, SuiteResult
from test_judges import make_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _error(args, tmp_path, pattern):
    code, output = _run(*args)
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    assert pattern in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("args, pattern", [
    (["bench", "--suite", "nope"], "unknown suite 'nope'; choose one of conceptbench, world"),
    (["bench", "--suite", "world", "--concepts", "star,pony"], "unknown concept pony"),
    (["bench", "--suite", "world", "--n", "0"], "--n must be a positive integer, got 0"),
    (["bench", "--suite", "world", "--n", "-2"], "--n must be a positive integer"),
    (["bench", "--suite", "world", "--inversion", "some"], "unknown inversion scope 'some'"),
    (["bench", "--suite", "world", "--judge", "eye"], "unknown judge 'eye'"),
    (["eval", "--concept", "pony"], "unknown concept 'pony' in suite 'world'; valid: circle"),
    (["eval", "--concept", "star", "--category", "style"], "is category object"),
    (["eval", "--concept", "star", "--category", "colour"], "unknown category 'colour'"),
    (["eval", "--concept", "star", "--steps", "0"], "--steps must be a positive integer"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, pattern, tmp_path):
    if args[0] == "bench" or "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    line = _error(args, tmp_path, pattern)
    if "unknown concept" in pattern:
        assert "valid:" in line


def test_nudenet_missing_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_nudenet(name, *args, **kwargs):
        if name == "nudenet" or name.startswith("nudenet."):
            raise ModuleNotFoundError("No module named 'nudenet'", name="nudenet")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "nudenet", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_nudenet)
    _error(["eval", "--model", "some/model", "--concept", "nudity", "--out",
            str(tmp_path / "out")], tmp_path, "pip install 'forget-me-not[nudenet]'")


def test_non_empty_out_is_refused_unless_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    code, output = _run("bench", "--suite", "world", "--out", str(out))
    assert code == 2 and "exists and is not empty; pass --overwrite" in output
    assert (out / "old.txt").read_text() == "keep me"

    calls = []

    def fake_run_bench(model, suite, concepts, patches, out_dir, **kw):
        calls.append((model, suite, concepts, patches, out_dir, kw))
        score = RecognitionScore(1.0, np.ones(2), np.ones(2, bool), ["a star"] * 2, [0, 1])
        return SuiteResult([ConceptResult("star", Concept("star"), "world", False, "main",
                                          MScore(score))], [], {})

    monkeypatch.setattr(runner, "run_bench", fake_run_bench)
    code, output = _run("bench", "--suite", "world", "--out", str(out), "--overwrite",
                        "--concepts", "star,moon", "--n", "3", "--patch", "a.safetensors")
    assert code == 0, output
    model, suite, concepts, patches, out_dir, kw = calls[0]
    assert (model, suite, concepts, [p.name for p in patches]) == (
        "embedded", "world", ["star", "moon"], ["a.safetensors"])
    assert kw["overwrite"] and kw["n"] == 3 and kw["steps"] is None
    assert "star" in output and "100.0%" in output


def test_bench_cli_end_to_end_on_a_tiny_pipeline(tiny_pipeline_dir, clip_dir, tmp_path):
    out = tmp_path / "out"
    code, output = _run("bench", "--model", str(tiny_pipeline_dir("sd1")), "--suite", "world",
                        "--concepts", "star,zorbo", "--judge", "clip", "--judge-model",
                        str(clip_dir), "--n", "2", "--steps", "2", "--inversion", "none",
                        "--out", str(out), "--device", "cpu")
    assert code == 0, output
    data = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in data["concepts"]] == ["star", "star @ outlined", "zorbo",
                                                    "zorbo @ striped"]
    assert all(c["judge"] == "clip" and c["after"] is None for c in data["concepts"])
    assert (out / "report.html").is_file() and (out / "plots/mscore.png").is_file()
    assert "wrote" in output


def test_eval_cli_end_to_end_with_inversion(tiny_pipeline_dir, clip_dir, tmp_path):
    code, output = _run("eval", "--model", str(tiny_pipeline_dir("sd1")), "--concept", "moon",
                        "--suite", "world", "--judge", "clip", "--judge-model", str(clip_dir),
                        "--n", "1", "--steps", "1", "--budget", "2", "--device", "cpu")
    assert code == 0, output
    line = next(ln for ln in output.splitlines() if ln.startswith("moon"))
    assert line.count("%") == 3  # G, I and M
    assert not (tmp_path / "out").exists()
