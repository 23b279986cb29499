"""Mode subspace overlap (MSO) of two matrices (Ponkshe et al. 2026).

For a matrix X (d × n, columns are samples or input directions; only its column space in R^d
matters), ``Q_X(eta)`` is the fewest top left singular vectors of X whose squared singular values
carry at least a fraction ``eta`` of Σσ². Then

    MSO(A, B; eta) = ‖Q_Aᵀ Q_B‖²_F / min(k_A, k_B)     in [0, 1]

(1 = the smaller subspace lies inside the larger; 0 = orthogonal). Two independent uniformly random
subspaces of dimensions k_A, k_B in R^d have E‖Q_Aᵀ Q_B‖²_F = k_A k_B / d, so the random baseline
is ``max(k_A, k_B) / d``. For activations stacked n × d (one row per prompt), pass the transpose:
the subspaces live in the hidden space R^d.
"""

from __future__ import annotations

import torch


def energy_rank(sigma: torch.Tensor, eta: float) -> int:
    """The fewest leading singular values whose squares carry a fraction ``eta`` of Σσ² (≥ 1).

    Float64 cumulative sums, with a relative slack of 1e-9 so that ``eta = 1`` reaches the last
    nonzero singular value rather than failing on rounding. Returns 0 when Σσ² = 0.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    e = sigma.double().pow(2)
    total = float(e.sum())
    if total == 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(eta - 1e-9, dtype=torch.float64)).item()) + 1
    return min(k, sigma.numel())


def left_basis(x: torch.Tensor, eta: float) -> torch.Tensor:
    """``Q_X(eta)``: d × k orthonormal columns (k = 0 for X = 0); exact float32 SVD on x's device."""
    left, sigma, _ = torch.linalg.svd(x.float(), full_matrices=False)
    return left[:, : energy_rank(sigma, eta)]


def mso(qa: torch.Tensor, qb: torch.Tensor) -> float | None:
    """``‖Q_Aᵀ Q_B‖²_F / min(k_A, k_B)`` for orthonormal column bases (None if either is empty)."""
    if qa.shape[0] != qb.shape[0]:
        raise ValueError(f"bases live in different spaces: {qa.shape[0]} vs {qb.shape[0]} rows")
    k = min(qa.shape[1], qb.shape[1])
    if k == 0:
        return None
    return float((qa.T.double() @ qb.double()).pow(2).sum()) / k


def random_mso(ka: int, kb: int, d: int) -> float:
    """The MSO expected of two independent uniformly random subspaces: ``max(k_A, k_B) / d``."""
    return max(ka, kb) / d


def left_factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left singular vectors, singular values)`` of x: exact float32 SVD on x's device."""
    left, sigma, _ = torch.linalg.svd(x.float(), full_matrices=False)
    return left, sigma


def mso_curve(a, b, etas: list[float]) -> list[dict]:
    """MSO of A and B (same number of rows d) at every ``eta``, each SVD computed once.

    ``a``/``b``: a matrix, or its :func:`left_factors` (to reuse one SVD across several pairs).
    Returns ``[{"eta", "k_a", "k_b", "mso", "random"}]``; ``mso``/``random`` are None when A or B is 0.
    """
    la, sa = left_factors(a) if isinstance(a, torch.Tensor) else a
    lb, sb = left_factors(b) if isinstance(b, torch.Tensor) else b
    if la.shape[0] != lb.shape[0]:
        raise ValueError(f"A has {la.shape[0]} rows and B {lb.shape[0]}: MSO compares subspaces of one space")
    d = la.shape[0]
    out = []
    for eta in etas:
        ka, kb = energy_rank(sa, eta), energy_rank(sb, eta)
        empty = ka == 0 or kb == 0
        out.append({"eta": eta, "k_a": ka, "k_b": kb, "mso": None if empty else mso(la[:, :ka], lb[:, :kb]),
                    "random": None if empty else random_mso(ka, kb, d)})
    return out
