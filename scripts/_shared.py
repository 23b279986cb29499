"""Helpers common to the build scripts (never imported at run time: users have no shared folder)."""

from __future__ import annotations

import hashlib
import re
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


# ---------------------------------------------------------------- prompts: normalising and near duplicates
# One rule for the build scripts (build_align_data, build_selfgen_data): lowercased word sequence for exact
# duplicates, word-set Jaccard >= JACCARD for near duplicates.
JACCARD = 0.7
STRONGREJECT = ("Non-violent crimes", "Violence", "Disinformation and deception",
                "Hate, harassment and discrimination", "Illegal goods and services", "Sexual content")
_WORD = re.compile(r"[a-z0-9']+")


def norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def near(a: frozenset, b: frozenset) -> bool:
    return bool(a or b) and len(a & b) / len(a | b) >= JACCARD


class Dedup:
    """Exact (normalised) and near (Jaccard) duplicate check against a growing set of prompts."""

    def __init__(self, prompts=()):
        self.exact, self.sets = set(), []
        for p in prompts:
            self.add(p)

    def add(self, p: str) -> None:
        self.exact.add(norm(p))
        self.sets.append(words(p))

    def hit(self, p: str) -> bool:
        w = words(p)
        return norm(p) in self.exact or any(near(w, s) for s in self.sets)
