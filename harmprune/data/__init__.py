"""Built-in datasets shipped as package data (see builtin/NOTICE.md for sources and licences).

The one accessor of shipped files: every module reaches them through :func:`path` or
:func:`read_bytes` (``importlib.resources``, so the names work from an installed wheel too).
``harmful`` / ``benign`` are the ``train`` split; ``:test`` and ``:all`` pick the held-out split or
both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl"}
SPLITS = ("train", "test", "all")
DEFAULT_SPLIT = "train"


def names() -> list[str]:
    """Every accepted built-in name."""
    out = []
    for base in FILES:
        out += [base] + [f"{base}:{s}" for s in SPLITS]
    return out


def parse(name: str) -> tuple[str, str | None] | None:
    """``(file name, split or None for all)`` for a built-in name, else None."""
    base, _, split = name.partition(":")
    split = split or DEFAULT_SPLIT
    if base not in FILES or split not in SPLITS:
        return None
    return FILES[base], (None if split == "all" else split)


def path(filename: str) -> Path:
    """Path of a file (or folder) shipped under ``harmprune/data/builtin``."""
    return Path(str(resources.files(__name__).joinpath("builtin", filename)))


def read_bytes(filename: str) -> bytes:
    return path(filename).read_bytes()
