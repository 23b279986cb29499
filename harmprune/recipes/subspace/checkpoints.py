"""The subspace study's view of checkpoints: tensor selection and summaries over ``core.tensors``'s
streamed reader (``TensorReader``, ``local_checkpoint``, ``check_same_layout`` re-exported here)."""

from __future__ import annotations

import json

from ...core.errors import HarmpruneError
from ...core.tensors import TensorReader
from ...core.targets import DEFAULT_TARGETS, matches


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def select_tensors(shapes: dict[str, tuple[int, ...]], targets: list[str] | None = None,
                   ignore: list[str] | None = None) -> list[str]:
    """Tensor names to project, in checkpoint order.

    Default (no ``targets``): the 2-D ``.weight`` tensors inside repeated blocks (a ``.<digits>.``
    in the name), i.e. the decoder-block linear weights, as ``core.targets`` selects for scoring.
    With ``targets``, a pattern selects a tensor when it matches the tensor's name
    (``model.norm.weight``, ``*.bias``) or its module's name (``*.mlp.*`` → that module's weight
    and bias), so embeddings, norms and biases can be included. Raises when a pattern matches nothing.
    """
    ignore = list(ignore or [])
    if not targets:
        chosen = [n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2
                  and any(matches(_module(n), p) for p in DEFAULT_TARGETS)]
    else:
        for pat in targets:
            if not any(matches(n, pat) or matches(_module(n), pat) for n in shapes):
                raise HarmpruneError(f"--targets pattern {pat!r} matches no tensor (e.g. {', '.join(list(shapes)[:3])})")
        chosen = [n for n in shapes if any(matches(n, p) or matches(_module(n), p) for p in targets)]
    chosen = [n for n in chosen if not any(matches(n, p) or matches(_module(n), p) for p in ignore)]
    if not chosen:
        raise HarmpruneError("no tensor left after --targets/--ignore")
    return chosen


def checkpoint_info(reader: TensorReader) -> dict:
    """What a manifest records about an input checkpoint: spec, directory, tensor count, config sha."""
    cfg = reader.dir / "config.json"
    info = {"spec": reader.spec, "dir": str(reader.dir), "tensors": len(reader.shapes)}
    if cfg.is_file():
        info["architectures"] = json.loads(cfg.read_text()).get("architectures")
    return info
