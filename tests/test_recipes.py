"""Recipes as data: every shipped recipe loads, bad files and overrides fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from forget_me_not import methods, recipes
from forget_me_not.api import plan
from forget_me_not.errors import FmnError


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = recipes.load(name)
    assert recipe.parts and recipe.description
    for config in (*recipe.configs(False), *recipe.configs(True)):
        assert type(config) in {methods.get(p.method).config_class for p in recipe.parts}


BENCH_RECIPES = sorted((Path(__file__).parent.parent / "benchmarks" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=[p.stem for p in BENCH_RECIPES])
def test_every_benchmark_recipe_still_loads_with_todays_settings(path):
    # BENCHMARKS.md cites these files by command: a renamed setting must not break them.
    recipe = recipes.load(path)
    assert recipe.parts and recipe.description
    for config in (*recipe.configs(False), *recipe.configs(True)):
        assert type(config) in {methods.get(p.method).config_class for p in recipe.parts}


def test_every_family_names_recipes_that_exist_for_it():
    for family in ("sd1", "sd2", "sdxl", "embedded"):
        default = recipes.default_for(family)
        assert default in recipes.names()
        recipes.load(default).check_family(family)


def test_paper_is_refused_on_sdxl_with_a_suggestion():
    with pytest.raises(FmnError, match="paper-lora"):
        plan("sdxl", recipe="paper")
    with pytest.raises(FmnError, match="not fmn|method token_rows"):
        plan("embedded", method="fmn", recipe="conceptworld-rows")
    with pytest.raises(FmnError, match="unknown method 'magic'.*fmn"):
        plan("sd1", method="magic")
    with pytest.raises(FmnError, match="unknown recipe 'magic'.*paper"):
        plan("sd1", recipe="magic")


@pytest.mark.parametrize("text,fragment", [
    ("parts: [{method: fmn, config: {steps: 2, magic: 1}}]", "unknown setting 'magic'"),
    ("parts: [{method: fmn, config: {steps: two}}]", "steps must be an integer"),
    ("parts: [{method: fmn, config: {lr: -1}}]", "learning rate"),
    ("parts: [{method: fmn, config: {train: everything}}]", "unknown train"),
    ("parts: [{method: nope}]", "unknown method"),
    ("parts: []", "non-empty list"),
    ("speed: fast\nparts: [{method: fmn}]", "unknown key 'speed'"),
    ("parts: [{method: fmn, scale: 2}]", "scale"),
    ("parts: [{: :", "not valid YAML"),
    ("parts: [{method: fmn}]\nparts: [{method: uce}]", "key 'parts' appears twice"),
    ("parts: [{method: fmn, config: {lr: 0.1, lr: 0.2}}]", "key 'lr' appears twice"),
])
def test_bad_recipe_files_name_the_key_and_the_file(tmp_path, text, fragment):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(FmnError, match=fragment) as err:
        recipes.load(path)
    assert str(path) in str(err.value) or "not valid" in str(err.value)


def test_set_overrides_every_part_with_the_key_or_one_part():
    recipe = recipes.load("conceptworld")
    lora, rows = recipe.configs(False, ["steps=7"])
    assert lora.steps == rows.steps == 7
    lora, rows = recipe.configs(False, ["token_rows.lr=0.5"])
    assert rows.lr == 0.5 and lora.lr != 0.5
    with pytest.raises(FmnError, match="valid keys: .*lora_rank"):
        recipe.configs(False, ["magic=1"])
    with pytest.raises(FmnError, match="lora_rank must be an integer"):
        recipe.configs(False, ["lora_rank=0"])


def test_anchored_overrides_apply_only_to_anchored_runs():
    recipe = recipes.load("conceptworld-lora")
    plain, anchored = recipe.configs(False)[0], recipe.configs(True)[0]
    changed = {k for k in recipe.parts[0].anchored if getattr(plain, k) != getattr(anchored, k)}
    assert changed and changed <= set(recipe.parts[0].anchored)


def test_cli_recipes_lists_methods_and_recipes():
    from typer.testing import CliRunner

    from forget_me_not.cli.main import app

    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    for name in (*methods.names(), *recipes.names()):
        assert name in result.output
    shown = CliRunner().invoke(app, ["recipes", "paper"])
    assert shown.exit_code == 0 and "extra_positions" in shown.output and "pooler" in shown.output
    by_kind = CliRunner().invoke(app, ["recipes", "conceptworld-by-kind"])
    assert "part 1: rece (scale 1, only concepts that name an anchor)" in by_kind.output
    assert "part 2: fmn (scale 1, only concepts without an anchor)" in by_kind.output
    assert "part 3: prune (scale 1, only concepts without an anchor)" in by_kind.output


def test_the_options_reference_is_current():
    from pathlib import Path

    from forget_me_not.options_doc import render

    committed = Path(__file__).parents[1] / "docs" / "options.md"
    assert committed.read_text() == render(), "run: python -m forget_me_not.options_doc > " \
                                              "docs/options.md"


def test_a_part_naming_a_recipe_can_change_some_of_its_settings(tmp_path):
    path = tmp_path / "derived.yaml"
    path.write_text("parts:\n  - recipe: conceptworld-robust\n    config: {steps: 7, "
                    "stop_pull: 0.1}\n")
    derived, base = recipes.load(path), recipes.load("conceptworld-robust")
    for flag in (False, True):  # the named recipe's anchored overrides still apply
        got, want = derived.configs(flag)[0], base.configs(flag)[0]
        assert got.stop_pull == 0.1 and got.steps == (want.steps if flag else 7)
        assert got.erase_weight == want.erase_weight and got.lr == want.lr
    path.write_text("parts:\n  - recipe: conceptworld-robust\n    config: {magic: 1}\n")
    with pytest.raises(FmnError, match="unknown setting 'magic'"):
        recipes.load(path)
