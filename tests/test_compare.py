"""`fmn bench --compare`: entries and targets checked first; a leaderboard from a real run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from forget_me_not.bench.compare import parse_entries, parse_targets, run_compare
from forget_me_not.bench.leaderboard import choice, overall, rank
from forget_me_not.cli.main import app
from forget_me_not.errors import FmnError


def test_entries_and_targets_are_checked(tmp_path):
    with pytest.raises(FmnError, match="at least two"):
        parse_entries(["uce"])
    with pytest.raises(FmnError, match="twice"):
        parse_entries(["uce", "uce"])
    with pytest.raises(FmnError, match="unknown recipe"):
        parse_entries(["uce", "magic"])
    with pytest.raises(FmnError, match="does not exist"):
        parse_entries(["uce", str(tmp_path / "p.safetensors")])
    assert parse_targets("star, skull+gun", ["star", "skull", "gun"]) == [["star"],
                                                                         ["skull", "gun"]]
    with pytest.raises(FmnError, match="unknown target 'cat'"):
        parse_targets("star,cat", ["star"])


def test_rank_puts_entries_that_forget_and_keep_first_then_the_lowest_m_score():
    rows = [{"target": "t", "entry": "a", "m_score": 0.0, "retention_min": 0.5},
            {"target": "t", "entry": "b", "m_score": 0.3, "retention_min": 0.99},
            {"target": "t", "entry": "c", "m_score": 0.1, "retention_min": 0.97},
            {"target": "t", "entry": "d", "m_score": 0.9, "retention_min": 1.0}]
    # d keeps everything by forgetting nothing: below a that forgets at a cost
    assert [r["entry"] for r in rank(rows, 0.95)] == ["c", "a", "b", "d"]


def _row(entry, method, target, m, kept):
    return {"entry": entry, "method": method, "target": target, "m_score": m,
            "retention_min": kept}


def test_the_default_rule_prefers_removal_then_targets_met_then_the_lowest_mean_m():
    rows = [_row("rows", "token_rows", t, 0.0, 1.0) for t in ("a", "b")]
    rows += [_row("lora", "fmn", "a", 0.1, 0.96), _row("lora", "fmn", "b", 0.2, 0.97)]
    rows += [_row("uce", "uce", "a", 0.0, 0.99), _row("uce", "uce", "b", 0.1, 0.5)]
    rows += [_row("keeps", "uce", "a", 0.9, 0.99), _row("keeps", "uce", "b", 0.95, 0.99)]
    summary = overall(rows, 0.95)
    # lora meets both bars on both targets; uce on one (lower mean M); keeps on none
    assert [o["entry"] for o in summary] == ["lora", "uce", "keeps", "rows"]
    assert summary[0]["m_mean"] == pytest.approx(0.15) and summary[1]["met_targets"] == 1
    assert summary[2]["kept_targets"] == 2 and summary[2]["met_targets"] == 0
    assert not summary[-1]["removes"] and summary[1]["removes"]
    assert choice(summary, 0.95).startswith("Choice: lora")
    hurt = [r if r["entry"] != "lora" else {**r, "retention_min": 0.2} for r in rows]
    said = choice(overall(hurt, 0.95), 0.95)
    assert said.startswith("No entry") and said.endswith(
        "uce (1 of 2 met, mean M 5%, worst retention min 0.50).")
    partial = [*rows, _row("new", "fmn", "a", 0.0, 1.0)]  # one target so far: not ranked first
    assert overall(partial, 0.95)[-2]["entry"] == "new"
    assert choice(overall(partial, 0.95), 0.95).startswith("Choice: lora")
    # An entry with another method per target names them all; one that hides on any target
    # does not count as removing.
    mixed = [_row("kind", "uce", "a", 0.1, 0.97), _row("kind", "fmn", "b", 0.1, 0.96)]
    (kind,) = overall(mixed, 0.95)
    assert kind["method"] == "uce / fmn" and kind["removes"]
    hiding = [_row("half", "fmn", "a", 0.1, 0.97), _row("half", "token_rows", "b", 0.1, 0.96)]
    assert not overall(hiding, 0.95)[0]["removes"]


def test_the_placebo_column_shows_only_where_it_was_measured():
    from forget_me_not.bench.leaderboard import COLUMNS, PLACEBO, columns

    plain = [_row("a", "fmn", "x", 0.1, 0.97)]
    assert columns(plain) == COLUMNS
    keys = [k for k, _ in columns([{**plain[0], "placebo_retention_min": 0.94}])]
    assert keys.index(PLACEBO[0]) == keys.index("retention_mean") + 1
    assert len(keys) == len(COLUMNS) + 1


def test_cli_compare_refuses_bad_input_before_loading(tmp_path):
    runner = CliRunner()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    for args, fragment in ((["--compare", "uce"], "at least two"),
                           (["--compare", "uce", "--compare", "conceptworld-uce"], "--targets"),
                           (["--compare", "uce", "--compare", "uce", "--targets", "star"],
                            "twice"), (["--placebo"], "with --compare")):
        result = runner.invoke(app, ["bench", "--suite", "world", "--out", str(tmp_path / "o"),
                                     *args])
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    result = runner.invoke(app, ["bench", "--suite", "world", "--out", str(full), "--compare",
                                 "uce", "--compare", "conceptworld-uce", "--targets", "star"])
    assert result.exit_code == 2 and "not empty" in result.stderr, result.stderr


def test_a_comparison_on_the_embedded_model_writes_and_resumes(tmp_path):
    suite = tmp_path / "mini.yaml"
    suite.write_text(
        "name: mini\ndescription: three world objects\n"
        "defaults: {n: 2, seed: 0, batch_size: 8, inversion: targets, budget: 2, num_tokens: 1,"
        " lr: 0.005, max_anchors: 2}\n"
        "categories:\n  object:\n    judge: world\n    templates: ['a photo of a {}']\n"
        "    concepts: [star, moon, circle]\n")
    out = tmp_path / "board"
    rows = run_compare("embedded", ["conceptworld-uce", "conceptworld-rows"], str(suite), "star",
                       out, progress=False, placebo=True)
    assert {r["entry"] for r in rows} == {"conceptworld-uce", "conceptworld-rows"}
    assert sorted(r["rank"] for r in rows) == [1, 2]
    for row in rows:
        assert row["target"] == "star" and row["g_before"] is not None
        assert row["i_after"] is not None and row["patch_bytes"] > 0
        parts = [row[k] for k in ("g_after", "i_after", "e_after", "p_after", "a_after")]
        assert row["m_score"] == max(parts)
        # Each other concept's retention is in the row; the lowest is retention min.
        each = row["retention_each"]
        assert set(each) <= {"moon", "circle"} and "star" not in each
        assert each == {} or abs(min(each.values()) - row["retention_min"]) < 1e-3
        assert row["stop"] is None  # neither recipe stops on the pull
        # A placebo of the patch's size: scored on the other concepts, never the target.
        assert row["placebo_retention_min"] is None or row["placebo_retention_min"] >= 0
    # A token-row patch only hides the word: the base text encoder gets the concept back as the
    # base model draws it (same seeds), and the M-Score says so.
    rows_row = next(r for r in rows if r["entry"] == "conceptworld-rows")
    assert rows_row["e_after"] == rows_row["g_before"] == rows_row["m_score"]
    for name in ("json", "csv", "md", "html", "png"):
        assert (out / f"leaderboard.{name}").stat().st_size > 0
    assert "conceptworld-uce" in (out / "leaderboard.md").read_text()
    assert "placebo retention min" in (out / "leaderboard.md").read_text()
    # An interrupted comparison resumes from its finished runs.
    (out / "runs" / "conceptworld-uce__star.json").write_text(json.dumps({**rows[0],
        "entry": "conceptworld-uce", "forget_seconds": -1.0}))
    again = run_compare("embedded", ["conceptworld-uce", "conceptworld-rows"], str(suite),
                        "star", out, progress=False)
    assert [r for r in again if r["entry"] == "conceptworld-uce"][0]["forget_seconds"] == -1.0


def test_attacks_encoder_view_and_paraphrases():
    import torch

    from forget_me_not.attacks import check, encoder_view, paraphrases
    from forget_me_not.concepts import Concept
    from forget_me_not.patch import Patch

    rows = {"text_encoder.token_ids": torch.tensor([3]),
            "text_encoder.token_delta": torch.ones(1, 4)}
    assert encoder_view(Patch("embedding", rows, {}, None, "rows")) is None
    delta = {"unet.a.weight": torch.ones(2, 2)}
    both = encoder_view(Patch("delta", {**delta, **rows}, {}, None, "both"))
    assert set(both.tensors) == set(delta)
    star = Concept("star", templates=("a photo of a {}",))
    found = paraphrases(star, exclude=("a star",))
    assert found and "a photo of a star" not in found and "a star" not in found
    assert any("STAR" in p for p in found) and any("in striped style" in p for p in found)
    with pytest.raises(FmnError, match="unknown attack 'magic'.*adversarial"):
        check(["magic"])


def test_the_attacks_learn_from_other_images_than_the_forgetting(tmp_path):
    """On the embedded model the leaderboard trains on a world concept's references and attacks
    with renders of other scenes; `fmn attack` takes those same attack renders."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from forget_me_not.bench.compare import _Scorer
    from forget_me_not.cli.attack import _with_images
    from forget_me_not.concepts import Concept
    from forget_me_not.models import load_pipeline

    def pixels(paths):
        return {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in paths}

    scorer = object.__new__(_Scorer)  # only the pipeline and the settings are read
    scorer.pipe, scorer.settings = load_pipeline("embedded"), {"max_anchors": 8}
    star = Concept("star", "object", ("a photo of a {}",))
    base = SimpleNamespace(concepts=[SimpleNamespace(concept=star)])
    train, score = scorer.with_references(base, tmp_path / "bench")
    trained, attacked = pixels(train["star"].images), pixels(score["star"].images)
    assert len(trained) >= 8 and len(attacked) >= 8
    assert not trained & attacked
    cli = _with_images(scorer.pipe, star, None, tmp_path / "cli")
    assert pixels(cli.images) == attacked
