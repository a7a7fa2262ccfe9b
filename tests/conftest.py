"""Shared fixtures: tiny pipelines saved once per test session, never any network."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# Set before diffusers/transformers are imported anywhere, so nothing tries the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models gain nothing from several threads, and on a busy 2-core machine thread contention
# made a 2-step sample 50x slower (0.17 s with one thread, 8.7 s with two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_pipelines import FAMILIES, make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_pipeline_dir("sd1")` -> a folder holding that tiny pipeline (save_pretrained).

    Built once per family and session and shared between tests: treat it as read-only
    (copy it with shutil.copytree before changing anything inside).
    """
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{family}") / "pipeline"
            make_tiny_pipeline(family).save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return get


@pytest.fixture(scope="session")
def world_dir(tiny_pipeline_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    """The tiny SD 1 pipeline dressed as the embedded model (its folder carries the marker)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("world") / "model"
    shutil.copytree(tiny_pipeline_dir("sd1"), folder)
    (folder / "conceptworld.json").write_text(json.dumps({"family": "embedded"}))
    return folder


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over "sd1", "sd2" and "sdxl"."""
    return request.param
