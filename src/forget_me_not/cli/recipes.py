"""`fmn recipes`: the methods and recipes there are, and what one recipe sets."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from forget_me_not.errors import FmnError


def recipes_command(
    name: Annotated[str | None, typer.Argument(help="A recipe to show in full.")] = None,
) -> None:
    """List the methods and recipes, or show one recipe's resolved settings."""
    from forget_me_not import methods, recipes

    if name is None:
        typer.echo("methods:")
        for m in methods.names():
            spec = methods.get(m)
            typer.echo(f"  {m:12s} {spec.summary}")
        typer.echo("recipes:")
        for r in recipes.names():
            recipe = recipes.load(r)
            fams = "/".join(recipe.families) or "any"
            typer.echo(f"  {r:18s} {'+'.join(p.method for p in recipe.parts):16s} {fams:14s} "
                       f"{recipe.description}")
        return
    recipe = recipes.load(name)
    typer.echo(f"{recipe.name}: {recipe.description}")
    typer.echo(f"file: {recipe.path}")
    if recipe.departs:
        typer.echo(f"departs from the paper: {recipe.departs}")
    for i, part in enumerate(recipe.parts):
        kind = {"anchored": ", only concepts that name an anchor",
                "plain": ", only concepts without an anchor"}.get(part.only, "")
        typer.echo(f"part {i + 1}: {part.method} (scale {part.scale:g}{kind})")
        for f in dataclasses.fields(part.config):
            typer.echo(f"  {f.name:22s} {getattr(part.config, f.name)!r}")
        for key, value in part.anchored.items():
            typer.echo(f"  anchored {key:13s} {value!r}")


def check_sets(recipe: Any, sets: list[str]) -> None:
    """Validate `--set` pairs against the recipe before any work (both variants of it)."""
    recipe.configs(False, sets)
    recipe.configs(True, sets)


def split_cli_keys(sets: list[str], keys: tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
    """`--set` pairs the command takes itself (not recipe fields), apart from the rest."""
    from forget_me_not.settings import parse_pair

    rest, own = [], {}
    for pair in sets:
        key, value = parse_pair(pair)
        if key in keys:
            own[key] = value
        else:
            rest.append(pair)
    for key in ("separately", "extra_templates"):
        if key in own and not isinstance(own[key], bool):
            raise FmnError(f"--set {key} must be true or false, got {own[key]!r}")
    return rest, own


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes_command)
