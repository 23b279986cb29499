"""Attribution: exact per-weight SNIP, |SNIP| and Wanda scores in one pass over the data.

``compute_scores`` (records in, scores out) is the in-memory API; ``score`` is the stage that
loads a model and data and writes ``scores.safetensors`` + ``meta.json``; ``load_scores`` reads
them back for the pruner. Score direction: see ``formulas``. (The package attribute ``score`` is
the function; import the module as ``harmprune.attribution.score`` via ``from ... import``.)
"""

from .engine import attribute, compute_scores
from .formulas import DIRECTIONS, FORMULAS, METHODS
from .artifact import Scores, load_scores, write_scores
from .score import ScoreConfig, score  # noqa: F811 - the function shadows its module

__all__ = ["attribute", "compute_scores", "METHODS", "FORMULAS", "DIRECTIONS", "ScoreConfig", "score", "Scores",
           "load_scores", "write_scores"]
