"""The `--judge` option of the benchmark scripts that read samples with a world judge."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from forget_me_not.judges.world import DEFAULT_WEIGHTS, WorldJudge


def add_judge_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", type=Path, default=DEFAULT_WEIGHTS,
                        help="world judge weights (default: the shipped judge)")


def chosen_judge(path: Path) -> WorldJudge:
    """The world judge at `path`; a missing file is a one-line error, before any work."""
    if not path.is_file():
        raise SystemExit(f"no judge weights {path}: pass a .safetensors file from fmn world "
                         "train-judge, or leave --judge out for the shipped judge")
    return WorldJudge(path)


def judge_digest(path: Path) -> str:
    """Its weights' short digest: which judge read a set of figures."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
