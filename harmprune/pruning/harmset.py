"""B-TAP's harm-specific set, scored one way: the harm and benign scores of a run through the one score
cache (``attribution.cache``), read lazily, for ``select.select_prune_set``."""

from __future__ import annotations

from ..attribution.cache import cached_scores
from ..core.models import ModelHandle
from ..core.options import PruneInputs
from .checkpoint import load_scores


def score_pair(handle: ModelHandle, cfg: PruneInputs, need_benign: bool = True):
    """The harm and benign scores of ``cfg`` (through the score cache), read lazily: ``(harm, benign|None)``."""
    harm = load_scores(cached_scores(handle, cfg.harm, cfg.method, cfg, cfg.scores_dir), lazy=True)
    benign = load_scores(cached_scores(handle, cfg.benign, cfg.benign_method, cfg, cfg.scores_dir), lazy=True) \
        if need_benign else None
    return harm, benign
