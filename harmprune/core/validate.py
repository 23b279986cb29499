"""Reusable checks of user settings, run before any model is loaded or any data scored.

Each ``check_*`` raises :class:`HarmpruneError` with one line naming the flag and what to pass
instead; config classes call them from ``__post_init__``. :func:`warn` prints one
``harmprune: warning: ...`` line to stderr for settings that are legal but almost certainly wrong.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import HarmpruneError


def warn(message: str) -> None:
    """One line on stderr: ``harmprune: warning: <message>``."""
    print(f"harmprune: warning: {message}", file=sys.stderr, flush=True)


def check_finite(value: float | None, flag: str) -> None:
    """``value`` is a finite number (``nan``/``inf`` parse as floats on the command line)."""
    if value is not None and not math.isfinite(value):
        raise HarmpruneError(f"{flag} must be a finite number, got {value}")


def check_fraction(value: float, flag: str) -> None:
    """``value`` is a finite fraction in [0, 1]."""
    check_finite(value, flag)
    if not 0.0 <= value <= 1.0:
        raise HarmpruneError(f"{flag} must be a fraction in [0, 1], got {value:g}")


def check_grid(values: Iterable[float] | None, flag: str) -> list[float]:
    """A sweep grid: a non-empty list of distinct fractions in [0, 1]; returns it as a list."""
    values = list(values or [])
    if not values:
        raise HarmpruneError(f"{flag} needs at least one value")
    for v in values:
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise HarmpruneError(f"{flag}: every value must be a fraction in [0, 1], got {v:g}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise HarmpruneError(f"{flag} lists {dup[0]:g} twice")
    return values


def fraction_warnings(q: float, p: float, flag_q: str = "--q", flag_p: str = "--p") -> list[str]:
    """Warnings for a (q, p) that is legal but almost certainly a mistake (q and p are fractions)."""
    out = []
    if q == 1.0:
        out.append(f"{flag_q} 1 selects every weight: this prunes a fraction 1 - p = {1 - p:.0%} of each matrix "
                   f"(q is a fraction: {flag_q} 1e-4 prunes 0.01%)")
    if p == 1.0:
        out.append(f"{flag_p} 1 protects every weight: nothing will be pruned (p is a fraction, e.g. {flag_p} 1e-2)")
    return out


def check_device(device: str, flag: str = "--device", allow_auto: bool = True) -> None:
    """``device`` names a torch device that exists here (``cuda`` needs a CUDA build and a GPU)."""
    import torch

    if allow_auto and device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        hint = " (for a GPU pass cuda or cuda:N)" if device.lower().startswith("gpu") else ""
        raise HarmpruneError(f"{flag} {device!r} is not a device{hint}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cpu" or d.type == "meta":
        return
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise HarmpruneError(f"{flag} {device}: {why}; pass {flag} cpu (or install a CUDA build of torch "
                                 "on a machine with a GPU)")
        count = torch.cuda.device_count()
        if d.index is not None and count and d.index >= count:
            raise HarmpruneError(f"{flag} {device}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
        return
    backend = getattr(torch.backends, d.type, None) or getattr(torch, d.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise HarmpruneError(f"{flag} {device}: no {d.type} device is available here; pass {flag} cpu")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(out: str | os.PathLike, flag: str = "--out") -> None:
    """``out`` can be created (or replaced) as a directory: the nearest existing ancestor of its
    parent is a directory in which a probe directory can actually be made (catches read-only mounts, /proc,
    a path below a regular file, missing permissions)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HarmpruneError(f"{flag} {out} is a file, not a directory; choose another path")
    base = _existing_ancestor(out.parent)  # where the temporary sibling is made and renamed
    if not base.is_dir():
        raise HarmpruneError(f"{flag} {out}: {base} is a file, so no directory can be made below it")
    try:
        probe = tempfile.mkdtemp(prefix=".harmprune-probe-", dir=base)
    except OSError as e:
        raise HarmpruneError(f"{flag} {out}: cannot create a directory in {base} ({e.strerror}); choose a writable location") from None
    shutil.rmtree(probe, ignore_errors=True)


def _paths(value) -> list[Path]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v).expanduser() for v in items if isinstance(v, (str, os.PathLike)) and str(v)]


def check_paths(classes, values: dict) -> None:
    """Outputs never touch inputs: no output path (``role="output"`` fields: --out, cache, factor and
    fine-tune directories) equals or contains an existing input path (``role="input"`` fields:
    checkpoints, data files, score directories), and no two outputs are the same directory or one
    inside the other, so neither a run nor its ``--overwrite`` can replace what it reads. Runs before
    anything is loaded or written."""
    from .settings import _flag, path_fields

    roles: dict[str, str] = {}
    for cls in classes:
        roles.update(path_fields(cls))
    inputs = [(n, p, p.resolve()) for n, r in roles.items() if r == "input" for p in _paths(values.get(n))
              if p.exists()]
    outputs = [(n, p, p.resolve()) for n, r in roles.items() if r == "output" for p in _paths(values.get(n))]
    for name, path, real in outputs:
        for iname, ipath, ireal in inputs:
            if real == ireal:
                raise HarmpruneError(f"{_flag(name)} {path} is also the input {_flag(iname)}: a command never "
                                     f"writes over what it reads; choose another {_flag(name)}")
            if real in ireal.parents:
                raise HarmpruneError(f"{_flag(name)} {path} contains the input {_flag(iname)} {ipath}: a command "
                                     f"never writes over what it reads; choose another {_flag(name)}")
    for i, (a, apath, areal) in enumerate(outputs):
        for b, bpath, breal in outputs[i + 1:]:
            if areal == breal:
                raise HarmpruneError(f"{_flag(a)} and {_flag(b)} are the same path {apath}; give each its own")
            if areal in breal.parents or breal in areal.parents:
                outer, inner = ((a, apath), (b, bpath)) if areal in breal.parents else ((b, bpath), (a, apath))
                raise HarmpruneError(f"{_flag(inner[0])} {inner[1]} lies inside {_flag(outer[0])} {outer[1]}; "
                                     "give each its own directory")
