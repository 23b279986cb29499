"""Safety subspaces (Ponkshe et al., "Safety Subspaces are Not Linearly Distinct", ICLR 2026): pure
tensor math, no I/O.

- :mod:`.projection`: the alignment update ``V = W_aligned - W_base`` of one tensor, factorised once
  (exact float32 SVD), its rank-k bases (top-k, seeded random-k, seeded Gaussian control) and the
  parallel / orthogonal projection of a later update ``U = W_finetuned - W_aligned`` with the energy
  it keeps.
- :mod:`.overlap`: mode subspace overlap (MSO) of two matrices at an energy fraction eta, and its
  random baseline.
- :mod:`.location`: where a set of weight coordinates (the B-TAP harm-specific set) sits relative
  to the alignment update.

Commands that read checkpoints and evaluate models live in ``harmprune.recipes.subspace``.
"""

from .overlap import energy_rank, left_basis, mso, mso_curve, random_mso
from .projection import BASES, MODES, SIDES, Factors, factorize, project, rank_for

__all__ = ["BASES", "MODES", "SIDES", "Factors", "factorize", "project", "rank_for", "energy_rank", "left_basis",
           "mso", "mso_curve", "random_mso"]
