"""Where a set of weight coordinates sits relative to the alignment update (pure tensor math).

For a tensor X (the alignment update V, or its rank-k part L Lᵀ V) and a boolean mask of the same
shape, the *share* carried by the mask is Σ_{mask} X² / Σ X². A random set of the same count has an
expected share of count / numel; a share above that means the set sits where X is large.
"""

from __future__ import annotations

import torch


def mass(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """``(Σ_{mask} x², Σ x²)`` as float64 Python floats."""
    sq = x.double().pow(2)
    return float(sq[mask.to(sq.device)].sum()), float(sq.sum())


def share(parts: list[tuple[float, float]]) -> float | None:
    """Σ numerators / Σ denominators over tensors (None when every denominator is 0)."""
    a = sum(p[0] for p in parts)
    b = sum(p[1] for p in parts)
    return a / b if b > 0 else None


def largest_magnitude(x: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` entries of largest |x| (ties broken by torch.topk's order)."""
    out = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    if count > 0:
        out[torch.topk(x.reshape(-1).abs().float(), count).indices] = True
    return out.reshape(x.shape)
