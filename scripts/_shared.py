"""Helpers common to the build scripts (never imported at run time: users have no shared folder)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_src() -> Path:
    """The project's shared data folder: /work/shared/data, else ../shared/data beside the repository."""
    for cand in (Path("/work/shared/data"), REPO.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    sys.exit("shared data folder not found; pass --src")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
