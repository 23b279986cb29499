"""Mask set math: counts, union, intersection, difference, overlap of prune sets, and what two random
sets of the same sizes would share. Pure, no I/O; the one mask count of the package.

A set is a mask dict ``{parameter name: bool tensor}``; matrices are disjoint universes, so every
count is a sum over matrices. Random reference: two sets drawn uniformly and independently with
sizes ``a`` and ``b`` in a matrix of ``n`` weights share ``a*b/n`` weights in expectation
(hypergeometric mean); summed over matrices, as the sets here are chosen per matrix.
"""

from __future__ import annotations

import torch

Masks = dict[str, torch.Tensor]


def count_of(m: torch.Tensor) -> int:
    """Selected entries of one mask tensor."""
    return int(torch.count_nonzero(m))  # much faster than bool .sum() on CPU


def count(a: Masks) -> int:
    return sum(count_of(m) for m in a.values())


def intersection(a: Masks, b: Masks) -> int:
    """|A ∩ B| over the keys both sets have."""
    return sum(int((a[k] & b[k]).sum()) for k in a if k in b)


def union_size(a: Masks, b: Masks) -> int:
    return count(a) + count(b) - intersection(a, b)


def jaccard(a: Masks, b: Masks) -> float | None:
    """|A ∩ B| / |A ∪ B|; None when both sets are empty."""
    u = union_size(a, b)
    return intersection(a, b) / u if u else None


def overlap_coefficient(a: Masks, b: Masks) -> float | None:
    """|A ∩ B| / min(|A|, |B|); None when either set is empty."""
    m = min(count(a), count(b))
    return intersection(a, b) / m if m else None


def expected_intersection(sizes_a: dict[str, int], sizes_b: dict[str, int], numel: dict[str, int]) -> float:
    """E|A ∩ B| for independent uniform sets with the given per-matrix sizes: Σ a_k b_k / n_k."""
    return sum(sizes_a.get(k, 0) * sizes_b.get(k, 0) / n for k, n in numel.items() if n)


def sizes(a: Masks) -> dict[str, int]:
    return {k: count_of(m) for k, m in a.items()}


def numels(a: Masks) -> dict[str, int]:
    return {k: m.numel() for k, m in a.items()}


def pair_overlap(a: Masks, b: Masks) -> dict:
    """Observed Jaccard / overlap coefficient, their random-set expectations and observed/random ratios.

    The random Jaccard uses the expected intersection ``e`` in ``e / (|A| + |B| - e)`` (a ratio of
    expectations, exact enough when sets are large; stated as such in the report).
    """
    na, nb, inter = count(a), count(b), intersection(a, b)
    e = expected_intersection(sizes(a), sizes(b), {**numels(a), **numels(b)})
    union = na + nb - inter
    out = {"size_a": na, "size_b": nb, "intersection": inter, "expected_intersection": e,
           "jaccard": inter / union if union else None,
           "jaccard_random": e / (na + nb - e) if na + nb - e > 0 else None,
           "overlap": inter / min(na, nb) if min(na, nb) else None,
           "overlap_random": e / min(na, nb) if min(na, nb) else None}
    out["jaccard_ratio"] = ratio(out["jaccard"], out["jaccard_random"])
    out["overlap_ratio"] = ratio(out["overlap"], out["overlap_random"])
    return out


def ratio(x: float | None, y: float | None) -> float | None:
    """x / y; None when undefined (either missing or y = 0)."""
    if x is None or y is None or y == 0:
        return None
    return x / y


def overlap_matrix(sets: dict[str, Masks]) -> dict:
    """All ordered pairs of named sets: ``{metric: [[value of (row, col)]]}`` plus the names.

    Metrics: jaccard, jaccard_random, jaccard_ratio, overlap, overlap_random, overlap_ratio,
    intersection, expected_intersection. The diagonal compares a set with itself.
    """
    names = list(sets)
    keys = ("jaccard", "jaccard_random", "jaccard_ratio", "overlap", "overlap_random", "overlap_ratio",
            "intersection", "expected_intersection")
    out = {k: [[None] * len(names) for _ in names] for k in keys}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j < i:  # symmetric
                for k in keys:
                    out[k][i][j] = out[k][j][i]
                continue
            po = pair_overlap(sets[a], sets[b])
            for k in keys:
                out[k][i][j] = po[k]
    return {"names": names, "sizes": {n: count(sets[n]) for n in names}, **out}


def union(sets: list[Masks]) -> Masks:
    """Elementwise OR over the keys of all sets."""
    out: Masks = {}
    for s in sets:
        for k, m in s.items():
            out[k] = out[k] | m if k in out else m.clone()
    return out


def difference(a: Masks, b: Masks) -> Masks:
    """A \\ B (B-TAP's ``A_not_B``): A's entries that are not in B."""
    return {k: (m & ~b[k]) if k in b else m.clone() for k, m in a.items()}
