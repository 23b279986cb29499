"""Rows of the ``harmprune_mc`` lm-eval task, read from the JSONL file beside this module (offline)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = Path(__file__).with_name("harmprune_mc.jsonl")


def load(**_kwargs):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with one ``test`` split (keyword arguments,
    which lm-eval fills from the task's metadata, are not used)."""
    import datasets

    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
