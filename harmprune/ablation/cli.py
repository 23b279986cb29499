"""``harmprune ablate``: a thin shell over ``ablation.run.ablate``."""

from __future__ import annotations


def _run(ns) -> None:
    from ..core.settings import from_namespace
    from .run import AblateConfig, ablate

    print(ablate(from_namespace(AblateConfig, ns)))


def register(subparsers) -> None:
    from ..core.settings import add_arguments
    from .run import AblateConfig

    p = subparsers.add_parser("ablate", help="per-category harm sets: overlap, transfer, compression curves, location",
                              description="Score each harm category, build its harm-specific set, and measure "
                                          "overlap (vs random sets), transfer across categories (and A minus B), "
                                          "compression curves and the layer/module distribution; writes "
                                          "results.json, report.md and figures.")
    add_arguments(p, AblateConfig)
    p.set_defaults(func=_run)
