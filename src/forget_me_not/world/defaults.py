"""Sampling defaults a model folder declares (the embedded world's `conceptworld.json`)."""

from __future__ import annotations

import json
from pathlib import Path

SD_GUIDANCE = 7.5


def world_marker(pipe) -> dict:
    """The `conceptworld.json` of the pipeline's folder, or {} for any other model."""
    folder = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    if not folder:
        return {}
    path = Path(folder) / "conceptworld.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def default_guidance(pipe) -> float:
    return float(world_marker(pipe).get("default_guidance", SD_GUIDANCE))


def default_steps(pipe) -> int:
    return int(world_marker(pipe).get("default_steps", 25))
