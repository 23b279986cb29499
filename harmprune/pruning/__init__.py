"""Pruning: select the harm-specific weights (or a control of the same size) and save a checkpoint.

Pure selection lives in ``select``, in-place application in ``apply``, files in ``checkpoint``,
and the stage (Python API = CLI) in ``prune``.
"""

from .apply import apply_mask, masked, restore
from .checkpoint import load_mask, load_scores, save_checkpoint, save_mask
from .select import (harm_specific, importance, magnitude_control, random_control, second_band_control,
                     select_prune_set, topk_mask)

__all__ = ["apply_mask", "masked", "restore", "load_mask", "load_scores", "save_checkpoint", "save_mask",
           "harm_specific", "importance", "magnitude_control", "random_control", "second_band_control",
           "select_prune_set", "topk_mask"]
