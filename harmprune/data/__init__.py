"""Built-in datasets shipped as package data (see builtin/NOTICE.md for sources and licences).

The one accessor of shipped files: every module reaches them through :func:`path` or
:func:`read_bytes` (``importlib.resources``, so the names work from an installed wheel too).
``harmful`` / ``benign`` are the ``train`` split; ``:test`` and ``:all`` pick the held-out split or
both. The other names are whole files without splits: ``harmful-selfgen`` (the base model's own judged
harmful replies, for scoring), ``harmful-heldout`` (StrongREJECT prompts with the base model's harmful
reply, for evaluation under the prefill attack), ``sensitive-safe`` (compliant replies to safe requests
that sound harmful, for protection); ``scripts/build_selfgen_data.py`` builds them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "harmful-selfgen": "harmful_selfgen.jsonl",
         "harmful-heldout": "harmful_heldout.jsonl", "sensitive-safe": "sensitive_safe.jsonl"}
SPLIT_FILES = ("harmful", "benign")  # files whose rows carry a train/test ``split``
SPLITS = ("train", "test", "all")
DEFAULT_SPLIT = "train"


def names() -> list[str]:
    """Every accepted built-in name."""
    out = []
    for base in FILES:
        out += [base] + ([f"{base}:{s}" for s in SPLITS] if base in SPLIT_FILES else [])
    return out


def parse(name: str) -> tuple[str, str | None] | None:
    """``(file name, split or None for all)`` for a built-in name, else None."""
    base, colon, split = name.partition(":")
    if base in FILES and base not in SPLIT_FILES:
        return (FILES[base], None) if not colon else None
    split = split or DEFAULT_SPLIT
    if base not in FILES or split not in SPLITS:
        return None
    return FILES[base], (None if split == "all" else split)


def path(filename: str) -> Path:
    """Path of a file (or folder) shipped under ``harmprune/data/builtin``."""
    return Path(str(resources.files(__name__).joinpath("builtin", filename)))


def read_bytes(filename: str) -> bytes:
    return path(filename).read_bytes()
