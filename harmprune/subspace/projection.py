"""Projection of a fine-tuning update onto (or off) the alignment subspace of one tensor.

Definitions (Ponkshe et al. 2026), per tensor of shape (m, n):

- ``V = W_aligned - W_base`` (alignment update), ``U = W_finetuned - W_aligned`` (later update).
- ``k = max(1, round(rho * min(m, n)))`` (round half up), ``0 < rho <= 1``.
- Bases of k orthonormal columns in R^m: ``topk`` = the top-k left singular vectors of V;
  ``randk`` = k of V's left singular vectors picked at random (a seeded permutation, so the set at a
  smaller rho is contained in the set at a larger one); ``gaussian`` = the top-k left singular
  vectors of a seeded standard Gaussian matrix of V's shape.
- ``parallel``: ``W_aligned + L Lᵀ U``; ``orth``: ``W_aligned + (U - L Lᵀ U)``. The two kept parts
  add up to U exactly and, L being orthonormal, their squared norms add up to ‖U‖².
- Energy kept = ‖kept‖² / ‖U‖² (per tensor; totals are sums of numerators over sums of denominators).
- 1-D tensors (norms, biases) are treated as an (n, 1) column, so k = 1 and the top basis is V/‖V‖:
  the parallel part is the scalar projection ``(<U, V> / ‖V‖²) V``. Tensors with more than two
  dimensions are flattened to (shape[0], -1).

``side="left"`` is the paper's definition. For a tall matrix (m > n) the n left singular vectors
span only n of R^m's m dimensions, so even rho = 1 keeps only the part of U in V's column space;
``side="short"`` projects on the shorter side instead (``U R Rᵀ`` with the right singular vectors
when m > n), for which rho = 1 keeps U exactly. A tensor with V = 0 has an empty alignment
subspace: its parallel part is 0 and its orthogonal part is U.

Each tensor is factorised once (:func:`factorize`, SVD of V and of the Gaussian control in float32
on V's device); :func:`project` then serves any rho and basis from the factors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

BASES = ("topk", "randk", "gaussian")
MODES = ("parallel", "orth")
SIDES = ("left", "short")


def rank_for(rho: float, m: int, n: int) -> int:
    """``k = max(1, round(rho * min(m, n)))`` with round half up, never above ``min(m, n)``."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    r = min(m, n)
    return min(r, max(1, math.floor(rho * r + 0.5)))


def stream_seed(seed: int, name: str, salt: str) -> int:
    """A 63-bit seed for one tensor's random stream: depends on (seed, tensor name, purpose) only."""
    digest = hashlib.sha256(f"{seed}:{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view the definitions use: 1-D → (n, 1) column, >2-D → (shape[0], -1)."""
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


@dataclass
class Factors:
    """Everything :func:`project` needs about one alignment update, computed once.

    ``left``: V's left singular vectors (columns, in the working orientation), by decreasing
    singular value; ``sigma``: the singular values; ``gauss``: the left singular vectors of the
    Gaussian control; ``perm``: the random-k order of V's singular vectors; ``transposed``: the
    working orientation is Vᵀ (``side="short"`` on a tall matrix); ``shape``: the tensor's shape.
    ``left`` is None when V = 0.
    """

    left: torch.Tensor | None
    sigma: torch.Tensor
    gauss: torch.Tensor
    perm: torch.Tensor
    transposed: bool
    shape: tuple[int, ...]

    @property
    def full_rank(self) -> int:
        """min(m, n) of the working matrix: the k of rho = 1."""
        return self.gauss.shape[1]

    def k(self, rho: float) -> int:
        m, n = self.gauss.shape[0], self.full_rank
        return rank_for(rho, m, n) if len(self.shape) > 1 else 1

    def basis(self, rho: float, kind: str) -> torch.Tensor | None:
        """The (rows × k) orthonormal basis of ``kind`` at ``rho`` (None for V = 0)."""
        if kind not in BASES:
            raise ValueError(f"unknown basis {kind!r}; choose one of {BASES}")
        if self.left is None:
            return None
        k = self.k(rho)
        if kind == "topk":
            return self.left[:, :k]
        if kind == "randk":
            return self.left[:, self.perm[:k].to(self.left.device)]
        return self.gauss[:, :k]


def _orient(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    x = as_matrix(t.float())
    return x.T if transposed else x


def factorize(v: torch.Tensor, seed: int = 0, name: str = "", side: str = "left") -> Factors:
    """Exact float32 SVD of ``v`` (and of a seeded Gaussian matrix of its shape) on v's device.

    The random streams (Gaussian entries, random-k order) depend only on ``(seed, name)``, are
    drawn on the CPU (identical on every device) and moved to v's device.
    """
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {SIDES}")
    m = as_matrix(v)
    transposed = side == "short" and v.dim() > 1 and m.shape[0] > m.shape[1]
    x = _orient(v, transposed)
    left, sigma, _ = torch.linalg.svd(x, full_matrices=False)
    gen = torch.Generator().manual_seed(stream_seed(seed, name, "gaussian"))
    g = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    gauss = torch.linalg.svd(g, full_matrices=False)[0]
    gen = torch.Generator().manual_seed(stream_seed(seed, name, "randk"))
    perm = torch.randperm(sigma.numel(), generator=gen)
    zero = not bool(torch.any(x != 0))
    return Factors(None if zero else left, sigma, gauss, perm, transposed, tuple(v.shape))


def parallel_part(u: torch.Tensor, basis: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``L Lᵀ U`` in the tensor's own shape and float32 (0 for an empty basis)."""
    if basis is None:
        return torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    x = _orient(u, transposed)
    p = basis @ (basis.T @ x)
    return (p.T if transposed else p).reshape(u.shape)


def project(u: torch.Tensor, factors: Factors, rho: float, basis: str = "topk", mode: str = "parallel"
            ) -> tuple[torch.Tensor, dict]:
    """The kept part of the update ``u`` (float32, u's shape) and its energy record.

    ``mode="parallel"`` keeps ``L Lᵀ U``, ``"orth"`` keeps ``U - L Lᵀ U``. The record holds
    ``k``, ``kept`` = ‖kept‖², ``update`` = ‖U‖² and ``fraction`` = kept / update (None for U = 0).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if tuple(u.shape) != factors.shape:
        raise ValueError(f"update has shape {tuple(u.shape)} but the alignment update {factors.shape}")
    uf = u.float()
    par = parallel_part(uf, factors.basis(rho, basis), factors.transposed)
    kept = par if mode == "parallel" else uf - par
    return kept, energy_record(kept, uf, factors.k(rho))


def energy_record(kept: torch.Tensor, u: torch.Tensor, k: int) -> dict:
    """``{"k", "kept": ‖kept‖², "update": ‖U‖², "fraction"}`` as Python floats (float64 sums)."""
    a = float(kept.double().pow(2).sum())
    b = float(u.double().pow(2).sum())
    return {"k": k, "kept": a, "update": b, "fraction": a / b if b > 0 else None}


def total_energy(records: dict[str, dict]) -> dict:
    """Σ kept / Σ update over tensors (None when every update is 0)."""
    a = sum(r["kept"] for r in records.values())
    b = sum(r["update"] for r in records.values())
    return {"kept": a, "update": b, "fraction": a / b if b > 0 else None, "tensors": len(records)}
