"""Judges: who decides whether an image shows a concept.

`get_judge("world" | "clip" | "nudenet", **kw)` builds one; each is imported lazily so that a
missing optional dependency only matters to the judge that needs it.
"""

from forget_me_not.judges.base import (
    DEFAULT_THRESHOLD,
    BaseJudge,
    Judge,
    check_supported,
    get_judge,
    judge_names,
    register_judge,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "BaseJudge",
    "Judge",
    "check_supported",
    "get_judge",
    "judge_names",
    "register_judge",
]
