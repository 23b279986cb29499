"""Apply a selection to a loaded model, in place, without ever writing through a tied weight.

``apply_mask`` zeroes (``action="zero"``) or scales (``action="scale"``, by ``alpha``) the
selected entries and returns what it overwrote, so ``restore`` can undo it exactly; ``masked``
wraps both as a context manager for sweeping many settings over one loaded model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..core.errors import HarmpruneError
from ..core.targets import tied_parameters

ACTIONS = ("zero", "scale")
Restore = dict[str, tuple[torch.Tensor, torch.Tensor]]


def check_mask(model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Every key must be a parameter of ``model`` with the same shape and must not be tied.

    A tied weight (e.g. ``lm_head`` sharing the embedding) is refused: writing through the tie
    would silently change the other parameter too.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    ties = tied_parameters(model)
    for name, m in mask.items():
        if name not in params:
            raise HarmpruneError(f"mask key {name} is not a parameter of this model "
                                 f"(e.g. {next(iter(params))}); is it the same architecture?")
        if tuple(m.shape) != tuple(params[name].shape):
            raise HarmpruneError(f"mask for {name} has shape {tuple(m.shape)} but the model's "
                                 f"parameter is {tuple(params[name].shape)}")
        if m.dtype != torch.bool:
            raise HarmpruneError(f"mask for {name} has dtype {m.dtype}, expected bool")
        if ties.get(name) and bool(torch.count_nonzero(m)):
            raise HarmpruneError(f"refusing to prune {name}: it is tied to {', '.join(ties[name])} "
                                 "and pruning it would change that too")


@torch.no_grad()
def apply_mask(model: nn.Module, mask: dict[str, torch.Tensor], action: str = "zero",
               alpha: float | None = None) -> Restore:
    """Zero or scale the masked entries in place; return ``{name: (flat indices, old values)}``."""
    if action not in ACTIONS:
        raise HarmpruneError(f"unknown action {action!r}; expected one of {ACTIONS}")
    if action == "scale" and alpha is None:
        raise HarmpruneError("--action scale needs --alpha")
    check_mask(model, mask)
    params = dict(model.named_parameters(remove_duplicate=False))
    saved: Restore = {}
    for name, m in mask.items():
        flat = params[name].data.view(-1)
        idx = m.reshape(-1).nonzero().squeeze(1).to(flat.device)
        if idx.numel() == 0:
            continue
        saved[name] = (idx, flat[idx].clone())
        if action == "zero":
            flat[idx] = 0
        else:
            flat[idx] = flat[idx] * alpha
    return saved


@torch.no_grad()
def restore(model: nn.Module, saved: Restore) -> None:
    """Undo ``apply_mask`` exactly (bit for bit)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (idx, old) in saved.items():
        params[name].data.view(-1)[idx] = old


@contextlib.contextmanager
def masked(model: nn.Module, mask: dict[str, torch.Tensor], action: str = "zero",
           alpha: float | None = None) -> Iterator[nn.Module]:
    """Prune inside the block and restore the original weights on exit (also on error)."""
    saved = apply_mask(model, mask, action, alpha)
    try:
        yield model
    finally:
        restore(model, saved)
