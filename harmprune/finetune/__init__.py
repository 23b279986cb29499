"""Narrow fine-tuning (LoRA, full, QLoRA) that can keep a pruning mask at exactly zero."""

from .masking import BoundMask, bind_mask, masked_merge
from .train import FinetuneConfig, finetune

__all__ = ["BoundMask", "FinetuneConfig", "bind_mask", "finetune", "masked_merge"]
