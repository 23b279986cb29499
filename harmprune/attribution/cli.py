"""``harmprune score``: a thin shell over ``attribution.score.score``."""

from __future__ import annotations


def _run(ns) -> None:
    from ..core.settings import from_namespace
    from .score import ScoreConfig, score

    print(score(from_namespace(ScoreConfig, ns)))


def register(subparsers) -> None:
    from ..core.settings import add_arguments
    from .score import ScoreConfig

    p = subparsers.add_parser("score", help="per-weight attribution scores (snip, snip-abs, wanda) for a dataset",
                              description="Score every matched linear weight for producing a dataset, in one "
                                          "pass; writes scores.safetensors and meta.json to --out.")
    add_arguments(p, ScoreConfig)
    p.set_defaults(func=_run)
