"""The score artifact (DESIGN.md): a directory with ``scores.safetensors`` + ``meta.json``.

One writer and one validated reader, shared by ``harmprune score``, the pipeline and ablation
caches, and the pruner. Scores are keyed by full parameter name and have the weight's shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import manifest
from ..core.errors import HarmpruneError
from .formulas import METHODS

SCORES_FILE = "scores.safetensors"
META_FILE = "meta.json"
REQUIRED_META = ("method", "model_hash", "shapes")


@dataclass
class Scores:
    """One score directory: tensors keyed by parameter name, its meta.json and the file's sha256."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict
    sha256: str

    @property
    def method(self) -> str:
        return self.meta["method"]


def write_scores(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write both files into an existing (temporary) directory; the caller makes it atomic."""
    from safetensors.torch import save_file

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise HarmpruneError(f"score meta lacks {missing}")  # a programming error, caught before writing
    d = Path(directory)
    save_file(tensors, str(d / SCORES_FILE), metadata={"method": meta["method"], "format": "harmprune-scores"})
    manifest.write_json(d / META_FILE, meta)


def load_scores(directory: str | os.PathLike) -> Scores:
    """Read a score directory and check that its files agree (keys, shapes, finite values)."""
    from safetensors.torch import load_file

    d = Path(directory)
    sfile, mfile = d / SCORES_FILE, d / META_FILE
    for f in (sfile, mfile):
        if not f.is_file():
            raise HarmpruneError(f"{f} not found: is {d} a score directory written by `harmprune score`?")
    meta = manifest.read_json(mfile)
    for key in REQUIRED_META:
        if key not in meta:
            raise HarmpruneError(f"{mfile} lacks the field {key!r}")
    if meta["method"] not in METHODS:
        raise HarmpruneError(f"{mfile}: unknown method {meta['method']!r}; expected one of {METHODS}")
    tensors = load_file(str(sfile))
    if set(tensors) != set(meta["shapes"]):
        extra = sorted(set(tensors) ^ set(meta["shapes"]))
        raise HarmpruneError(f"{d}: scores and meta.json list different keys, e.g. {extra[0]}")
    for name, t in tensors.items():
        if list(t.shape) != list(meta["shapes"][name]):
            raise HarmpruneError(f"{sfile}: {name} has shape {list(t.shape)}, meta.json says {meta['shapes'][name]}")
        if not bool(torch.isfinite(t).all()):
            raise HarmpruneError(f"{sfile}: {name} holds NaN or infinite scores")
    return Scores(d, tensors, meta, manifest.sha256_file(sfile))
