"""Shipped prompt sets a retention term can keep (`preserve_set` in a recipe)."""

from __future__ import annotations

from collections.abc import Sequence

from forget_me_not.errors import FmnError


def prompt_set(name: str, avoid: Sequence[str]) -> tuple[str, ...]:
    """The set's prompts, none of which mentions a word of `avoid` (the targets)."""
    if name == "conceptworld":
        from forget_me_not.world.concepts import retention_prompts

        return retention_prompts(list(avoid))
    raise FmnError(f"unknown prompt set {name!r}: use conceptworld")
