"""The score artifact (docs/design.md): a directory with ``scores.safetensors`` + ``meta.json``.

One writer and one validated reader, shared by ``harmprune score``, the pipeline and ablation
caches, and the pruner. Scores are keyed by full parameter name and have the weight's shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import manifest, stfile
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


class LazyTensors(Mapping):
    """Read-only ``{name: tensor}`` view of a safetensors file that reads one tensor per access.

    Lets the pruner hold one matrix's scores at a time instead of the whole file (an 8B model's
    float32 scores are 32 GB per dataset). Non-finite values are reported when a tensor is read.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:
            self._keys = list(f.keys())
            self.shapes = {k: list(f.get_slice(k).get_shape()) for k in self._keys}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.shapes:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            t = f.get_tensor(name)
        _check_finite(self.path, name, t)
        return t

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in self.shapes


def _check_finite(path: Path, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise HarmpruneError(f"{path}: {name} holds NaN or infinite scores")


def write_scores(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write both files into an existing (temporary) directory; the caller makes it atomic."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise HarmpruneError(f"score meta lacks {missing}")  # a programming error, caught before writing
    d = Path(directory)
    # byte-reproducible: same scores and meta -> same sha256 (recorded in prune_config.json)
    stfile.write(d / SCORES_FILE, tensors, metadata={"method": meta["method"], "format": "harmprune-scores"})
    manifest.write_json(d / META_FILE, meta)


def fix_hint(directory: str | os.PathLike) -> str:
    return f"delete {directory} and re-run the command that wrote it (scores are recomputed)"


def read_meta(directory: str | os.PathLike) -> dict:
    """``meta.json`` of a score directory as a dict, or one line saying it is corrupt and what to do."""
    import json

    mfile = Path(directory) / META_FILE
    try:
        meta = json.loads(mfile.read_text(encoding="utf-8"))
    except OSError as e:
        raise HarmpruneError(f"{mfile}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarmpruneError(f"{mfile}: meta.json is corrupt or cut short ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0]}); {fix_hint(directory)}") from None
    if not isinstance(meta, dict):
        raise HarmpruneError(f"{mfile}: meta.json is not a JSON object; {fix_hint(directory)}")
    return meta


def load_scores(directory: str | os.PathLike, lazy: bool = False) -> Scores:
    """Read a score directory and check that its files agree (keys, shapes, finite values).

    ``lazy``: ``tensors`` is a ``LazyTensors`` view that reads each matrix when it is accessed
    (finiteness is then checked per access); use it when the scores of a large model do not fit twice.
    A file that is cut short or corrupt ends in one line naming it and saying to delete the
    directory and re-run (``fix_hint``).
    """
    d = Path(directory)
    sfile, mfile = d / SCORES_FILE, d / META_FILE
    for f in (sfile, mfile):
        if not f.is_file():
            raise HarmpruneError(f"{f} not found: is {d} a score directory written by `harmprune score`?")
    meta = read_meta(d)
    stfile.check(sfile, "the score file", fix_hint(d))
    for key in REQUIRED_META:
        if key not in meta:
            raise HarmpruneError(f"{mfile} lacks the field {key!r}")
    if meta["method"] not in METHODS:
        raise HarmpruneError(f"{mfile}: unknown method {meta['method']!r}; expected one of {METHODS}")
    tensors = LazyTensors(sfile) if lazy else stfile.load(sfile, "the score file", fix_hint(d))
    shapes = tensors.shapes if lazy else {k: list(t.shape) for k, t in tensors.items()}
    if set(shapes) != set(meta["shapes"]):
        extra = sorted(set(shapes) ^ set(meta["shapes"]))
        raise HarmpruneError(f"{d}: scores and meta.json list different keys, e.g. {extra[0]}")
    for name, shape in shapes.items():
        if shape != list(meta["shapes"][name]):
            raise HarmpruneError(f"{sfile}: {name} has shape {shape}, meta.json says {meta['shapes'][name]}")
        if not lazy:
            _check_finite(sfile, name, tensors[name])
    return Scores(d, tensors, meta, manifest.sha256_file(sfile))
