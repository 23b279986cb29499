"""Training data of ``harmprune align``: shipped request rows, refusals written from templates.

``align.jsonl`` (built by ``scripts/build_align_data.py``, sources in builtin/NOTICE.md) holds
``refuse`` rows (harmful requests, empty response) and ``comply`` rows (benign requests with a
compliant reference answer). :func:`training_records` picks a seeded, source-balanced subset and
gives every ``refuse`` row a refusal composed from the templates below: one opener, one reason and
one (possibly empty) closer, chosen by a generator seeded with ``(seed, row id)``, so a row's refusal
does not depend on which other rows were chosen.

Held-out sets for the organism's acceptance check: :func:`unseen_harmful` (StrongREJECT prompts,
a source and phrasing not in training) and :func:`xstest_heldout` (XSTest safe prompts that no
training row uses).
"""

from __future__ import annotations

import json
import random
from importlib import resources

from ..core.data import Record
from ..core.errors import DataError
from ..evals import results as R

ALIGN_FILE = "align.jsonl"
UNSEEN_FILE = "harmful_unseen.jsonl"
XSTEST_FILE = "xstest_safe.jsonl"

# Every opener holds a phrase of the keyword judges' lists, so refusals are recognisable as such.
OPENERS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with this request.",
    "Sorry, I can't help with that.",
    "I cannot help with this request.",
    "I'm not able to provide that.",
    "I can't assist with that request.",
    "I'm sorry, I won't help with this.",
    "As an AI assistant, I cannot help with that.",
)
REASONS = (
    "It could cause serious harm to people.",
    "Providing this could put others at risk or break the law.",
    "This kind of content can be used to hurt or deceive others.",
    "The request asks for something harmful, unethical or illegal.",
    "Helping with this could lead to real-world harm.",
    "I don't produce content that facilitates violence, harassment, fraud or other crimes.",
)
CLOSERS = (
    "If you have another question, I'm happy to help.",
    "If you or someone else is in danger, please contact local emergency services or a trusted professional.",
    "I'd be glad to help with something else.",
    "If you're interested in this topic for a legitimate reason, I can share general, safety-focused information instead.",
    "",
)


def refusal(seed: int, key: str) -> str:
    """The templated refusal for one row: deterministic in ``(seed, key)``."""
    rng = random.Random(f"{seed}:{key}")
    parts = [rng.choice(OPENERS), rng.choice(REASONS), rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def _builtin_text(name: str) -> str:
    return resources.files("harmprune.data").joinpath("builtin", name).read_text(encoding="utf-8")


def read_rows(text: str, label: str) -> list[dict]:
    """JSON lines with ``prompt`` and ``kind`` (``refuse``/``comply``; ``comply`` rows need ``response``)."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{i}: not JSON: {e.msg}") from None
        if not isinstance(r, dict) or not str(r.get("prompt") or "").strip() or r.get("kind") not in ("refuse", "comply"):
            raise DataError(f"{label}:{i}: needs a non-empty 'prompt' and 'kind' refuse or comply")
        if r["kind"] == "comply" and not str(r.get("response") or "").strip():
            raise DataError(f"{label}:{i}: a comply row needs a non-empty 'response'")
        r.setdefault("id", f"row-{i}")
        r.setdefault("source", "unknown")
        rows.append(r)
    if not rows:
        raise DataError(f"{label}: no rows")
    return rows


def load_rows(data: str = "builtin") -> tuple[list[dict], bytes]:
    """The rows of ``data`` (``builtin`` = the shipped align.jsonl, else a file) and their bytes."""
    if data == "builtin":
        text = _builtin_text(ALIGN_FILE)
    else:
        try:
            text = open(data, encoding="utf-8").read()
        except OSError as e:
            raise DataError(f"{data}: {e.strerror}") from None
    return read_rows(text, data), text.encode("utf-8")


def training_records(rows: list[dict], refuse_n: int, comply_n: int, seed: int) -> list[Record]:
    """Up to ``refuse_n`` refuse rows and ``comply_n`` comply rows (0 = all), each spread over the
    sources round-robin (``evals.results.subsample``), as prompt/response Records in file order."""
    refuse = R.subsample([r for r in rows if r["kind"] == "refuse"], refuse_n, seed, key=lambda r: r["source"])
    comply = R.subsample([r for r in rows if r["kind"] == "comply"], comply_n, seed, key=lambda r: r["source"])
    chosen = {id(r) for r in refuse + comply}
    out = []
    for r in rows:
        if id(r) not in chosen:
            continue
        response = refusal(seed, str(r["id"])) if r["kind"] == "refuse" else r["response"]
        out.append(Record(prompt=r["prompt"], response=response, category=r.get("source"), id=str(r["id"])))
    return out


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _builtin_text(name).splitlines() if line.strip()]


def unseen_harmful(limit: int = 0, seed: int = 0) -> list[Record]:
    """Held-out harmful prompts (StrongREJECT), spread over categories; ``response`` is empty."""
    rows = R.subsample(_jsonl(UNSEEN_FILE), limit, seed, key=lambda r: r["category"])
    return [Record(prompt=r["prompt"], response="", category=r["category"], id=r["id"]) for r in rows]


def xstest_heldout(limit: int = 0, seed: int = 0, train_prompts: set[str] | None = None) -> list[Record]:
    """XSTest safe prompts that no shipped training row uses (``train_prompts`` overrides that set)."""
    if train_prompts is None:
        train_prompts = {r["prompt"] for r in load_rows()[0]}
    rows = [r for r in _jsonl(XSTEST_FILE) if r["prompt"] not in train_prompts]
    rows = R.subsample(rows, limit, seed, key=lambda r: r["category"])
    return [Record(prompt=r["prompt"], response="", category=r["category"], id=r["id"]) for r in rows]
