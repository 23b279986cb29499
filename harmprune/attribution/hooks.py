"""Capture shells: forward hooks that hand a linear layer's inputs X and output gradients δ to the
formulas as soon as both exist, so no per-layer gradient outlives its own backward step.

All parameters are frozen during a run and the input-embedding output is made to require grad, so
backward computes activation gradients only; no weight ``.grad`` is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import HarmpruneError
from . import formulas


@dataclass
class BatchState:
    """What the hooks need to know about the batch in flight.

    ``mask`` (B, T) bool selects the token positions that count: non-pad tokens for gradients
    (δ is exactly zero at padding, and skipping it avoids 0·NaN from fully masked rows), the
    chosen positions for wanda. ``all_true`` lets the hooks skip indexing when nothing is masked.
    """

    mask: torch.Tensor | None = None
    all_true: bool = True
    _buffers: dict = field(default_factory=dict)

    def set(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.all_true = bool(self.mask.all())

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A scratch matrix shared by all layers of one shape: never a second copy of all gradients."""
        key = (tuple(like.shape), like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty_like(like)
        return self._buffers[key]

    def release(self) -> None:
        self._buffers.clear()


@dataclass
class LayerCapture:
    """Accumulates one linear layer's score statistic (see ``formulas``) over a run."""

    name: str
    module: nn.Linear
    method: str
    state: BatchState
    acc: torch.Tensor = field(init=False)
    calls: int = 0

    def __post_init__(self):
        self.acc = formulas.new_accumulator(self.method, self.module.weight)

    # -- rows of X / δ that count -------------------------------------------------------------
    def _per_token(self, t: torch.Tensor) -> bool:
        m = self.state.mask
        if m is not None and t.dim() == 3 and t.shape[:2] == m.shape:
            return True
        if self.method == "snip":
            return False  # the signed sum needs no per-sample split: sum every row
        raise HarmpruneError(
            f"{self.name} does not see tokens in (batch, sequence) layout (input shape {tuple(t.shape)}), "
            f"which {self.method} needs; exclude it with --ignore")

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if not self._per_token(t) or self.state.all_true:
            return t.reshape(-1, t.shape[-1])
        return t[self.state.mask]

    # -- hooks --------------------------------------------------------------------------------
    def forward_hook(self, module, inputs, output):
        self.calls += 1
        x = inputs[0].detach()
        if self.method == "wanda":
            formulas.add_sq_norm(self.acc, self._rows(x).float())
            return
        if not output.requires_grad:
            return  # not on the loss's path (e.g. a frozen side branch): contributes nothing
        held = [x]

        def on_grad(delta: torch.Tensor):
            self._accumulate(held.pop(), delta.detach())

        output.register_hook(on_grad)

    def _accumulate(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        if self.method == "snip":
            formulas.add_grad(self.acc, self._rows(delta).float(), self._rows(x).float())
            return
        self._per_token(x)
        tmp = self.state.buffer(self.acc)
        m = self.state.mask
        for b in range(x.shape[0]):  # exact per-sample |δ_bᵀ X_b|; one (out, in) buffer at a time
            xb, db = x[b], delta[b]
            if not self.state.all_true:
                xb, db = xb[m[b]], db[m[b]]
            formulas.add_abs_grad(self.acc, db.float(), xb.float(), tmp)


def embedding_requires_grad_hook(module, inputs, output):
    """Make the embedding output a grad-requiring leaf so backward flows through activations."""
    return output.detach().requires_grad_(True)
