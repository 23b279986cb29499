"""``harmprune finetune``: a thin shell over ``finetune(FinetuneConfig)``."""

from __future__ import annotations

from ..core.settings import add_arguments, from_namespace


def register(subparsers) -> None:
    from .train import FinetuneConfig, finetune

    p = subparsers.add_parser(
        "finetune", help="narrow fine-tune (LoRA, --full or QLoRA), optionally keeping a pruning mask at 0",
        description="Fine-tune on chat data (response-only loss). --keep-mask keeps pruned weights exactly 0: "
                    "after every step with --full, and in the --merge checkpoint with LoRA (an unmerged "
                    "adapter does not keep the mask). Interrupted runs continue with --resume.")
    add_arguments(p, FinetuneConfig)
    p.set_defaults(func=lambda ns: finetune(from_namespace(FinetuneConfig, ns)))
