"""Score formulas as pure tensor functions (no hooks, no I/O).

Accumulators are float32 and summed over samples (docs/design.md allows one positive constant factor):
- ``snip``:     G    = Σ_x ∇_W L(x)        = Σ_x δ_xᵀ X_x    → S = W ⊙ G            (signed)
- ``snip-abs``: |G|  = Σ_x |∇_W L(x)|      = Σ_x |δ_xᵀ X_x|  → S = |W| ⊙ |G|
- ``wanda``:    Q_j  = Σ_t X_tj²  (chosen token positions)   → S = |W_ij| · sqrt(Q_j)
where X (tokens × in) are a linear layer's inputs and δ (tokens × out) the gradients of the loss
with respect to its outputs, both for one sample. Score direction: for ``snip`` the most negative
entries help produce the data most (zeroing W changes the loss by about -S); for ``snip-abs`` and
``wanda`` larger means more important.
"""

from __future__ import annotations

import torch

METHODS = ("snip", "snip-abs", "wanda")

FORMULAS = {
    "snip": "S = W * sum_x dL(x)/dW  (signed; L(x) = mean NLL over x's response tokens)",
    "snip-abs": "S = |W| * sum_x |dL(x)/dW|  (per-sample absolute gradients)",
    "wanda": "S_ij = |W_ij| * ||X_j||_2  (X = layer inputs at the chosen token positions)",
}

DIRECTIONS = {
    "snip": "most negative = removal raises the loss most = most helpful to producing the data",
    "snip-abs": "larger = more important",
    "wanda": "larger = more important",
}

# The one place that states the sign convention: the pruner ranks ``importance = SIGN * S``,
# larger = more important to producing the data (the first to prune from the harm scores).
SIGN = {"snip": -1.0, "snip-abs": 1.0, "wanda": 1.0}
IMPORTANCE = {m: ("-S" if SIGN[m] < 0 else "S") for m in METHODS}


def importance(scores: torch.Tensor, method: str) -> torch.Tensor:
    """Float32 importance of stored scores, larger = more important: ``SIGN[method] * S``."""
    if method not in SIGN:
        raise ValueError(f"unknown method {method!r}")
    s = scores.float()
    return -s if SIGN[method] < 0 else s


def new_accumulator(method: str, weight: torch.Tensor) -> torch.Tensor:
    """A float32 zero accumulator on the weight's device: (out, in) for gradients, (in,) for wanda."""
    shape = weight.shape[1:] if method == "wanda" else weight.shape
    return torch.zeros(shape, dtype=torch.float32, device=weight.device)


def add_grad(acc: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> None:
    """acc += δᵀX summed over all rows (tokens of any samples): delta (N, out), x (N, in)."""
    acc.addmm_(delta.t(), x)


def add_abs_grad(acc: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, tmp: torch.Tensor | None = None) -> None:
    """acc += |δᵀX| for ONE sample: delta (T, out), x (T, in). ``tmp`` (out, in) avoids an allocation."""
    g = torch.mm(delta.t(), x, out=tmp) if tmp is not None else torch.mm(delta.t(), x)
    acc.add_(g.abs_())


def add_sq_norm(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += Σ_rows X²: x (N, in)."""
    acc.add_(x.square().sum(0))


def finalize(method: str, weight: torch.Tensor, acc: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The stored score S (float32, weight's shape) from a weight and its accumulator.

    ``inplace`` reuses the accumulator's memory for a gradient method's score (saves one matrix).
    """
    w = weight.detach().float()
    if method == "snip":
        return acc.mul_(w) if inplace else w * acc
    if method == "snip-abs":
        return acc.mul_(w.abs()) if inplace else w.abs() * acc
    if method == "wanda":
        return w.abs() * acc.sqrt().unsqueeze(0)
    raise ValueError(f"unknown method {method!r}")
