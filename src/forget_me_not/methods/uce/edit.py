"""UCE's closed form on one linear layer, kept as its exact low-rank factors.

For a layer W (out, D), erased text states c_i with guide states c*_i, preserved states c_j:
  M  = lamb I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T              (D, D)
  W' = (lamb W + s_e sum_i W c*_i c_i^T + s_p sum_j W c_j c_j^T) M^-1  (the paper's eq. 7)
Since W M = lamb W + s_e sum_i W c_i c_i^T + s_p sum_j W c_j c_j^T, the preserve and lamb terms
cancel in W' - W, leaving W' - W = B A with B = W (C* - C)^T (out, n), A = s_e C M^-1 (n, D):
rank at most n, the number of erased states.
"""

from __future__ import annotations

import warnings

import torch

from forget_me_not.errors import FmnError

PROBES = 16  # random directions the factors are checked on
MAX_CONDITION = 1e10  # beyond this M is numerically singular in float64: regularise


def solve_inverse(second: torch.Tensor, lamb: float) -> tuple[torch.Tensor, float]:
    """M^-1 in float64, and M's condition number; a singular M is regularised with a warning."""
    eig = torch.linalg.eigvalsh(second)
    low, high = float(eig.min()), float(eig.max())
    condition = high / low if low > 0 else float("inf")
    if condition > MAX_CONDITION:
        ridge = max(high, 1.0) * 1e-8
        warnings.warn(f"UCE's system is singular (condition number {condition:.3g}, lamb "
                      f"{lamb:g}): regularised with {ridge:.2g} I; raise lamb to avoid this",
                      stacklevel=3)
        second = second + ridge * torch.eye(second.shape[0], dtype=second.dtype)
    return torch.linalg.inv(second), condition


class System:
    """M^-1 of one solve: M depends on the text states only, so every layer shares it."""

    def __init__(self, erased: torch.Tensor, guides: torch.Tensor, preserved: torch.Tensor,
                 erase_scale: float, preserve_scale: float, lamb: float) -> None:
        c, cs = erased.double().cpu(), guides.double().cpu()  # (n, D)
        p = preserved.double().cpu()  # (m, D)
        if c.shape != cs.shape:
            raise FmnError("UCE needs one guide state per erased state")
        second = lamb * torch.eye(c.shape[1], dtype=torch.float64) + erase_scale * c.T @ c
        if p.numel():
            second = second + preserve_scale * p.T @ p
        self.inverse, self.condition = solve_inverse(second, lamb)
        self.c, self.cs, self.p = c, cs, p
        self.erase_scale, self.preserve_scale, self.lamb = erase_scale, preserve_scale, lamb
        self.a = erase_scale * c @ self.inverse  # (n, D): the same A for every layer


def low_rank_edit(weight: torch.Tensor, system: System) -> dict[str, object]:
    """B (out, n), A (n, D) with W' = W + B A; the relative error of B A against W' computed
    by the formula itself."""
    w = weight.detach().double().cpu()  # (out, D)
    c, cs, p = system.c, system.cs, system.p
    if c.shape[1] != w.shape[1]:
        raise FmnError(f"UCE's text states are {c.shape[1]} wide, the layer takes {w.shape[1]}")
    erase_scale, preserve_scale, lamb = system.erase_scale, system.preserve_scale, system.lamb
    inverse, condition, a = system.inverse, system.condition, system.a
    b = w @ (cs - c).T  # (out, n)
    # The formula as written, checked on random directions X (D, k): the full product
    # mat1 @ M^-1 costs out * D^2 per layer, as much as the rest of SDXL's solve 20 times over.
    probe = torch.randn(w.shape[1], PROBES, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    y = inverse @ probe  # M^-1 X
    moved = lamb * (w @ y) + erase_scale * (w @ cs.T) @ (c @ y)  # W' X, term by term
    if p.numel():
        moved = moved + preserve_scale * (w @ p.T) @ (p @ y)
    direct = moved - w @ probe  # (W' - W) X
    scale = float(direct.norm()) or 1.0
    error = float((b @ (a @ probe) - direct).norm()) / scale
    return {"B": b.float(), "A": a.float(), "condition": condition, "error": error}
