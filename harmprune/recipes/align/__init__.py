"""The aligned organism: ``harmprune align`` (``run``; the ``smollm2-135m-aligned`` alias is its
``build_alias``) and the organism's acceptance check (``check``). Its training rows: ``evals.align_data``."""

from .check import CheckConfig, check_organism
from .run import AlignConfig, build_alias, run_align

__all__ = ["AlignConfig", "CheckConfig", "build_alias", "check_organism", "run_align"]
