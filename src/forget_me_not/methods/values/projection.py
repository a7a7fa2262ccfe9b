"""Value-space erasure on one linear layer, in the kept outputs' whitened coordinates.

For a layer W (out, D) and the kept prompts' text states H (m, D), every position:
  S = (H W^T)^T (H W^T) / m + ridge * mean variance * I = L L^T,   z = L^-1 y
whitens the kept outputs y = W h (their second moment becomes I). The concept's directions E
(out, k), orthonormal in z, are the top eigenvectors of the concept's whitened second moment,
each new one orthogonal to those taken before. The edit removes them from every output:
  W' = L (I - E E^T) L^-1 W = W + B A,   B = -L E (out, k),   A = E^T L^-1 W (k, D)
so no input, a learnt token's included, reaches them; among the edits that remove those
directions it is the one that moves the kept outputs least (the oblique projection of LEACE,
Belrose et al. 2023), each direction costing them one unit of whitened energy on average.
An average can hide one kept prompt that puts most of its energy where the concept does (a
colour sharing a direction with the attacker's token): `remove(..., worst=True)` chooses the
direction with most of the concept's energy per unit of the *worst* kept prompt's (the kept
prompts, `prompt_length` positions each, that lose most weighed up a few times over:
multiplicative weights).
"""

from __future__ import annotations

import torch

REWEIGHTS = 6  # multiplicative-weight passes when choosing a direction against the worst prompt


class LayerSpace:
    """One layer's whitening and the directions removed from its outputs so far."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, ridge: float,
                 prompt_length: int = 1) -> None:
        self.weight = weight.detach().double().cpu()  # (out, D)
        self.kept, self.prompt_length, self.ridge = kept, prompt_length, ridge
        outputs = kept.double() @ self.weight.T  # (m, out)
        second = outputs.T @ outputs / max(1, outputs.shape[0])
        size = second.shape[0]
        second = second + ridge * float(torch.trace(second)) / size * torch.eye(
            size, dtype=torch.float64)
        self.chol = torch.linalg.cholesky(second)  # L
        self.whiten = torch.linalg.inv(self.chol)  # L^-1
        self.removed = torch.zeros(size, 0, dtype=torch.float64)  # E
        self.ratios: list[float] = []  # the concept's whitened energy along each direction

    def remove(self, states: torch.Tensor, k: int, worst: bool = False) -> list[float]:
        """Remove the `k` directions carrying most of `states`' (n, D) outputs; their energies
        relative to the kept outputs' (1: as much as the kept prompts put there)."""
        z = (states.double() @ self.weight.T) @ self.whiten.T  # (n, out), whitened
        e = self.removed
        z = z - (z @ e) @ e.T  # what the removed directions no longer carry
        if worst:
            return [self._remove_worst_case(z) for _ in range(k)]
        energy, vectors = torch.linalg.eigh(z.T @ z / max(1, z.shape[0]))
        new = vectors[:, -k:].flip(1)
        new, _ = torch.linalg.qr(new - e @ (e.T @ new))
        self.removed = torch.cat([e, new], dim=1)
        taken = [round(float(x), 3) for x in energy.flip(0)[:k]]
        self.ratios += taken
        return taken

    def _remove_worst_case(self, z: torch.Tensor) -> float:
        """Remove the one direction with the most of `z`'s energy per unit of the worst kept
        prompt's; returns that concept energy (in units of the pooled kept energy)."""
        e = self.removed
        basis = torch.linalg.svd(torch.eye(e.shape[0], dtype=torch.float64) - e @ e.T)[0]
        basis = basis[:, : e.shape[0] - e.shape[1]]  # the directions still open
        zc = z @ basis
        concept = zc.T @ zc / max(1, zc.shape[0])
        kept = (self.kept.double() @ self.weight.T) @ self.whiten.T @ basis  # (m, r)
        per_prompt = kept.shape[0] // self.prompt_length
        weights = torch.ones(per_prompt, dtype=torch.float64)
        best: tuple[float, torch.Tensor, float] | None = None
        for _ in range(REWEIGHTS):
            rows = weights.repeat_interleave(self.prompt_length)[:, None] / weights.mean()
            held = (kept * rows).T @ kept / kept.shape[0]
            held = held + self.ridge * torch.eye(held.shape[0], dtype=torch.float64)
            chol = torch.linalg.cholesky(held)
            inv = torch.linalg.inv(chol)
            _, vectors = torch.linalg.eigh(inv @ concept @ inv.T)
            v = inv.T @ vectors[:, -1]
            v = v / v.norm()
            costs = (kept @ v).pow(2).reshape(per_prompt, -1).mean(1)
            gain = float(v @ concept @ v)
            score = gain / float(costs.max().clamp(min=1e-12))
            if best is None or score > best[0]:
                best = (score, v, gain)
            weights = weights * torch.exp(costs / costs.mean().clamp(min=1e-12) - 1).clamp(
                max=1e6)
        assert best is not None
        new = basis @ best[1]
        new = new - e @ (e.T @ new)
        self.removed = torch.cat([e, (new / new.norm())[:, None]], dim=1)
        self.ratios.append(round(best[2], 3))
        return round(best[2], 3)

    def factors(self) -> dict[str, torch.Tensor]:
        """B (out, k), A (k, D) with W' = W + B A."""
        e = self.removed
        return {"B": (-(self.chol @ e)).float(), "A": (e.T @ self.whiten @ self.weight).float()}

    def kept_cost(self, kept: torch.Tensor) -> float:
        """Share of `kept` (m, D) outputs' energy the edit takes away."""
        y = kept.double() @ self.weight.T
        f = self.factors()
        moved = kept.double() @ (f["B"].double() @ f["A"].double()).T
        return float(moved.norm() ** 2 / max(float(y.norm() ** 2), 1e-30))
