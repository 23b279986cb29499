"""Capture shells: forward hooks that hand a linear layer's inputs X and output gradients δ to the
formulas as soon as both exist, so no per-layer gradient outlives its own backward step.

All parameters are frozen during a run and the input-embedding output is made to require grad, so
backward computes activation gradients only; no weight ``.grad`` is ever materialised.

Offloaded layers (accelerate CPU/disk offload: ``module.weight`` is on ``meta`` outside its
forward) keep their accumulator on the CPU, where their weights live, and add each batch's
contribution from the compute device once; ``real_weight`` materialises a weight for ``finalize``.
Hooks that fire outside ``BatchState.in_forward`` are activation-checkpoint recomputations during
backward and are ignored, so every layer is counted once per batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..core.errors import HarmpruneError
from ..core.offload import is_offloaded, real_weight  # noqa: F401 (real_weight: engine imports it from here)
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
    in_forward: bool = False
    _buffers: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    def set(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.all_true = bool(self.mask.all())
        self._masks = {self.mask.device: self.mask}

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The mask on ``device`` (layers of a device map run on several devices), copied once per batch."""
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Mark the model's own forward; layer hooks outside it are checkpoint recomputations."""
        self.in_forward = True
        try:
            yield
        finally:
            self.in_forward = False

    def buffer(self, like: torch.Tensor, tag: str = "tmp", device: torch.device | None = None) -> torch.Tensor:
        """A scratch tensor shared by all layers of one shape: never a second copy of all gradients."""
        device = like.device if device is None else torch.device(device)
        key = (tag, tuple(like.shape), device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(like.shape, dtype=like.dtype, device=device)
        return self._buffers[key]

    def release(self) -> None:
        self._buffers.clear()
        self._masks.clear()


# -- accelerate offload (is_offloaded, real_weight, named_real_parameters: core.offload) -------------
def compute_device(module: nn.Module) -> torch.device:
    """Where the module's forward runs: accelerate's execution device, else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None and is_offloaded(module):
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return next(module.parameters()).device


@dataclass
class LayerCapture:
    """Accumulates one linear layer's score statistic (see ``formulas``) over a run."""

    name: str
    module: nn.Linear
    method: str
    state: BatchState
    acc: torch.Tensor = field(init=False)
    calls: int = 0
    staged: bool = field(init=False)

    def __post_init__(self):
        self.staged = is_offloaded(self.module)
        w = self.module.weight
        if self.staged:  # meta weight: only its shape counts; keep the sum on the CPU with the weights
            w = torch.empty((), device="cpu").expand(w.shape)
        self.acc = formulas.new_accumulator(self.method, w)

    def _target(self, device: torch.device) -> torch.Tensor:
        """Where this batch's contribution is added: the accumulator, or a zeroed staging buffer."""
        if not self.staged and self.acc.device == device:
            return self.acc
        return self.state.buffer(self.acc, "stage", device).zero_()

    def _flush(self, target: torch.Tensor) -> None:
        if target is not self.acc:
            self.acc.add_(target.to(self.acc.device))

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
        return t[self.state.mask_on(t.device)]

    # -- hooks --------------------------------------------------------------------------------
    def forward_hook(self, module, inputs, output):
        if not self.state.in_forward:
            return  # checkpoint recomputation in backward: X and δ were taken in the real forward
        self.calls += 1
        x = inputs[0].detach()
        if self.method == "wanda":
            target = self._target(x.device)
            formulas.add_sq_norm(target, self._rows(x).float())
            self._flush(target)
            return
        if not output.requires_grad:
            return  # not on the loss's path (e.g. a frozen side branch): contributes nothing
        held = [x]

        def on_grad(delta: torch.Tensor):
            self._accumulate(held.pop(), delta.detach())

        output.register_hook(on_grad)

    def _accumulate(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        target = self._target(x.device)
        if self.method == "snip":
            formulas.add_grad(target, self._rows(delta).float(), self._rows(x).float())
            self._flush(target)
            return
        self._per_token(x)
        tmp = self.state.buffer(target)
        m = None if self.state.all_true else self.state.mask_on(x.device)
        for b in range(x.shape[0]):  # exact per-sample |δ_bᵀ X_b|; one (out, in) buffer at a time
            xb, db = x[b], delta[b]
            if m is not None:
                xb, db = xb[m[b]], db[m[b]]
            formulas.add_abs_grad(target, db.float(), xb.float(), tmp)
        self._flush(target)


def embedding_requires_grad_hook(module, inputs, output):
    """Make the embedding output a grad-requiring leaf so backward flows through activations."""
    return output.detach().requires_grad_(True)
