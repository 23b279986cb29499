"""B-TAP's harm-specific set, built one way: scores through the one score cache, read lazily (one matrix in memory
at a time), then ``select.select_prune_set``; every recipe that prunes (and the subspace study) builds it here."""

from __future__ import annotations

from ..attribution.cache import cached_scores
from ..core.models import ModelHandle
from ..core.options import PruneInputs
from .checkpoint import Scores, load_scores
from .select import select_prune_set


def scores_of(handle: ModelHandle, data, method: str, opts, cache_dir, rows: list | None = None,
              label: str | None = None) -> Scores:
    """Scores of ``method`` on ``data`` with scoring options ``opts``, computed only on a cache miss, read lazily."""
    return load_scores(cached_scores(handle, data, method, opts, cache_dir, rows=rows, label=label), lazy=True)


def score_pair(handle: ModelHandle, cfg: PruneInputs, need_benign: bool = True):
    """The harm and benign scores of ``cfg`` (through the score cache), read lazily: ``(harm, benign|None)``."""
    harm = scores_of(handle, cfg.harm, cfg.method, cfg, cfg.scores_dir)
    benign = scores_of(handle, cfg.benign, cfg.benign_method, cfg, cfg.scores_dir) if need_benign else None
    return harm, benign


def harm_set(harm: Scores, benign: Scores | None, q: float, p: float, scope="matrix", selection="difference"):
    """``Top_q(I_harm) \\ Top_p(I_benign)`` (or the ``selection`` variant) of two score sets: ``(mask, stats)``."""
    return select_prune_set(harm.tensors, benign.tensors if benign else None, harm.method,
                            benign.method if benign else None, q, p, scope, selection=selection)
