"""Compression curves: effect of pruning versus the fraction of weights pruned.

A curve is a list of points ``{q, pruned, fraction, harm_effect, benign_effect, ...}`` sorted by
fraction. ``fraction_to_reach`` reads off how many weights a model needs to pruned to reach a given
harm effect (interpolated linearly in log fraction between the two points that bracket it): the
smaller, the more compressed that model's harm weights are.
"""

from __future__ import annotations

import math

from ...pruning.apply import masked
from ...pruning.masks import count


def fraction_to_reach(points: list[dict], target: float, key: str = "harm_effect") -> float | None:
    """Smallest pruned fraction at which ``key`` reaches ``target``, interpolated in log-x.

    Uses the first crossing along increasing fraction. If the first point already reaches the
    target, its fraction is returned (an upper bound); None if the curve never reaches it.
    Points with fraction 0 are ignored (log scale).
    """
    pts = sorted((p["fraction"], p[key]) for p in points if p["fraction"] > 0 and p[key] is not None
                 and not math.isnan(p[key]))
    if not pts:
        return None
    if pts[0][1] >= target:
        return pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 < target <= y1:
            t = (target - y0) / (y1 - y0)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


def point(model, tok, mask, numel: int, harm_rows: list, benign_rows: list, measure, benign_measure,
          base_harm: float, base_benign: float) -> dict:
    """Prune ``mask`` (in place, restored) and measure harm on ``harm_rows`` and NLL on ``benign_rows``."""
    n = count(mask)
    with masked(model, mask):
        h = measure(model, tok, harm_rows)
        b = benign_measure(model, tok, benign_rows) if benign_rows else None
    return {"pruned": n, "fraction": n / numel if numel else 0.0, "harm_value": h,
            "harm_effect": measure.sign * (h - base_harm), "benign_value": b,
            "benign_effect": None if b is None else b - base_benign}
