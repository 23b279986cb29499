"""The aligned organism: ``harmprune align`` (``run``, with the alias builder) and its check (``check``)."""

from .check import CheckConfig, check_organism
from .run import AlignConfig, build_alias, run_align

__all__ = ["AlignConfig", "CheckConfig", "build_alias", "check_organism", "run_align"]
