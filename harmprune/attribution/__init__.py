"""Attribution: exact per-weight SNIP, |SNIP| and Wanda scores in one pass over the data.

``compute_scores`` (records in, scores out) is the in-memory API; ``score`` is the stage that
loads a model and data and writes ``scores.safetensors`` + ``meta.json``; ``load_scores`` reads
them back for the pruner. Score direction: see ``formulas``.
"""

from .engine import attribute, compute_scores
from .formulas import DIRECTIONS, FORMULAS, METHODS

__all__ = ["attribute", "compute_scores", "METHODS", "FORMULAS", "DIRECTIONS", "ScoreConfig", "score", "load_scores"]


def __getattr__(name):
    # The stage pulls in data loading and safetensors; import it lazily so the engine stays light.
    if name in ("ScoreConfig", "score", "load_scores"):
        from . import score as _score

        return getattr(_score, name)
    raise AttributeError(name)
