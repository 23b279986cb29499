"""Dataset records: loading, field mapping, category filter, built-in datasets. (Being written.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    """One example: the user's request, the reply to score or learn, and optional metadata."""

    prompt: str
    response: str
    category: str | None = None
    id: str | None = None
