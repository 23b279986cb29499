"""Keep a pruning mask at exactly zero through fine-tuning (pure tensor code, no I/O).

A mask is ``{parameter name: bool tensor}`` as ``harmprune prune`` writes it (True = pruned).

- Full fine-tuning: zero the masked gradient entries before every optimizer step *and* set the masked
  weights back to 0 after it. Zeroing gradients alone is not enough in general: AdamW's momentum from
  earlier steps, decoupled weight decay on a weight that is not exactly 0, or a resumed optimizer
  state all move masked entries.
- LoRA: the base weights are frozen, so they stay 0, but the merged weight ``W + scale·B·A`` is dense
  and refills the masked entries. ``masked_merge`` merges and then zeroes them. An *unmerged* adapter
  applied at inference time adds ``scale·B·A`` on the fly and does NOT keep the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import HarmpruneError


@dataclass
class BoundMask:
    """A mask tied to a model's parameters, stored as flat indices (small for sparse masks)."""

    params: dict[str, nn.Parameter]
    index: dict[str, torch.Tensor]  # flat indices of the masked entries, on the parameter's device

    @property
    def numel(self) -> int:
        """Number of masked entries."""
        return sum(int(i.numel()) for i in self.index.values())

    @torch.no_grad()
    def zero_grads_(self) -> None:
        """Set the masked entries of every gradient to 0 (call after backward, before the step)."""
        for name, idx in self.index.items():
            g = self.params[name].grad
            if g is not None:
                g.view(-1).index_fill_(0, idx, 0)

    @torch.no_grad()
    def zero_weights_(self) -> None:
        """Set the masked weights to exactly 0 (call after every optimizer step)."""
        for name, idx in self.index.items():
            self.params[name].data.view(-1).index_fill_(0, idx, 0)

    @torch.no_grad()
    def nonzero(self) -> int:
        """How many masked weights are currently not 0 (0 means the mask holds)."""
        return sum(int(self.params[n].data.view(-1)[i].count_nonzero()) for n, i in self.index.items())


def bind_mask(model: nn.Module, mask: dict[str, torch.Tensor]) -> BoundMask:
    """Check the mask against the model (names, shapes, contiguity) and index its entries.

    Raises HarmpruneError naming the first key the model lacks or whose shape differs. Tied
    parameters are found under every name they have.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    bound, index = {}, {}
    for name, m in mask.items():
        if name not in params:
            raise HarmpruneError(f"mask key {name} is not a parameter of the model; the mask was made for "
                                 "another architecture")
        p = params[name]
        if tuple(m.shape) != tuple(p.shape):
            raise HarmpruneError(f"mask {name} has shape {list(m.shape)} but the parameter's is {list(p.shape)}")
        if not p.is_contiguous():
            raise HarmpruneError(f"parameter {name} is not contiguous; cannot keep its mask in place")
        bound[name] = p
        index[name] = m.reshape(-1).nonzero().squeeze(1).to(p.device)
    return BoundMask(bound, index)


def masked_merge(peft_model, mask: dict[str, torch.Tensor] | None) -> nn.Module:
    """Merge LoRA adapters into the base weights (``W + scale·B·A``) and zero the masked entries.

    Returns the plain base model (adapter layers removed); mask keys are the base model's parameter
    names. Without a mask this is peft's ``merge_and_unload``.
    """
    merged = peft_model.merge_and_unload()
    if mask:
        bind_mask(merged, mask).zero_weights_()
    return merged
