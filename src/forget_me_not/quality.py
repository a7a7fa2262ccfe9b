"""Image quality as a distance: KID between a model's samples of a concept and fresh renders of
it, on the judge's own features.

A forgetting that turns everything into blobs can keep the judge's labels for a while; the
distance to clean renders shows it. KID (the unbiased squared MMD with the cubic polynomial
kernel of Binkowski et al., 2018) rather than FID: it is unbiased at the 32 samples a concept
gets. Only judges that expose `features(images)` are measured (the ConceptWorld judge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD of feature sets a (N, D) and b (M, D), kernel (x.y / D + 1)^3."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("KID needs at least two samples on each side")
    d = a.shape[1]
    kxx = (a @ a.T / d + 1) ** 3
    kyy = (b @ b.T / d + 1) ** 3
    kxy = (a @ b.T / d + 1) ** 3
    n, m = len(a), len(b)
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def references(names: Sequence[str], n: int, seed: int = 777) -> dict[str, list[Any]]:
    """Fresh renders of each ConceptWorld concept (other seeds than any training renders)."""
    from forget_me_not.world import concepts as wc

    return {name: wc.reference_renders(wc.get(name), n, seed) for name in names}


def distances(judge: Any, samples: Mapping[str, Sequence[Any]],
              refs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """KID per concept of `samples` against `refs`, on `judge.features`."""
    out = {}
    for name, images in samples.items():
        if name in refs and len(images) >= 2:
            out[name] = kid(judge.features(list(images)), judge.features(list(refs[name])))
    return out


def worst_change(after: Mapping[str, float], before: Mapping[str, float],
                 skip: Sequence[str] = ()) -> tuple[str | None, float | None]:
    """The concept (not in `skip`) whose distance grew most, and by how much."""
    grown = {k: after[k] - before[k] for k in after if k in before and k not in skip}
    if not grown:
        return None, None
    name = max(grown, key=grown.__getitem__)
    return name, grown[name]


def spread(first: Mapping[str, float], second: Mapping[str, float],
           skip: Sequence[str] = ()) -> float | None:
    """The base model's run-to-run spread: the largest change between two seed ranges."""
    gaps = [abs(first[k] - second[k]) for k in first if k in second and k not in skip]
    return max(gaps) if gaps else None
