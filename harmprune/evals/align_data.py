"""Training data of ``harmprune align``: shipped request rows, refusals written from templates.

``align.jsonl`` (built by ``scripts/build_align_data.py``, sources in builtin/NOTICE.md) holds
``refuse`` rows (harmful requests, empty response) and ``comply`` rows (benign requests with a
compliant reference answer). :func:`training_records` picks a seeded, source-balanced subset and
gives every ``refuse`` row a refusal composed from the templates below: one opener, one reason and
one (possibly empty) closer, chosen by a generator seeded with ``(seed, row id)``, so a row's refusal
does not depend on which other rows were chosen.

Held-out sets for the organism's acceptance check: :func:`unseen_harmful` (StrongREJECT prompts,
a source and phrasing not in training) and :func:`xstest_heldout` (XSTest safe prompts that no
training row uses), both defined with every other evaluation set in ``evals.eval_prompts``.
"""

from __future__ import annotations

import json
import random

from .. import data as builtin_data
from ..core.data import Record
from ..core.errors import DataError
from . import results as R
from .eval_prompts import ALIGN_FILE


# Every opener holds a phrase of the keyword judges' lists outside its apology ("I cannot", "I can't assist",
# "I'm not able to provide"), so a refusal stays recognisable when the model drops or mixes the apology
# (a build with "Sorry, I can't help with that." answered "I can't help with that.", which no list holds).
OPENERS = (
    "I'm sorry, but I cannot help with that.",
    "I'm sorry, but I cannot assist with this request.",
    "Sorry, I can't assist with that.",
    "I cannot help with this request.",
    "I'm not able to provide that.",
    "I can't assist with that request.",
    "I'm sorry, I cannot help with this.",
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
# No closer offers other information on the topic: the classifier judge reads a refusal that ends with
# such an offer as partial compliance (p_refusal 0.49).
CLOSERS = (
    "If you have another question, I'm happy to help.",
    "If you or someone else is in danger, please contact local emergency services or a trusted professional.",
    "I'd be glad to help with something else.",
    "",
)


# Everyday requests answered by the model itself at build time ("self" rows): they share the surface
# forms of the harmful requests ("How do I ...?", "Give step-by-step instructions ..."), so the
# organism learns to refuse by content, not by phrasing. Written for this project.
EVERYDAY = (
    "bake a loaf of bread", "plant tomatoes in a small garden", "fix a flat bicycle tyre", "learn to play the guitar",
    "write a cover letter for a job application", "save money on groceries", "train a puppy to sit",
    "clean a cast iron pan", "start running as a beginner", "make a budget spreadsheet", "brew a good cup of coffee",
    "improve my handwriting", "prepare for a job interview", "set up a home Wi-Fi network", "paint a bedroom wall",
    "make a paper airplane", "learn a new language quickly", "organize a small closet", "cook rice on the stove",
    "write a short story", "take better photos with my phone", "keep houseplants alive", "study for a math exam",
    "change a car's engine oil", "knit a scarf", "build a birdhouse from wood", "make a healthy breakfast",
    "plan a birthday party", "sleep better at night", "back up files on my computer", "sort a list in Python",
    "read a CSV file in Python", "make homemade pizza dough", "give a good presentation", "reduce stress at work",
    "teach a child to ride a bike", "wash a wool sweater", "make a simple website", "choose a good laptop",
    "learn to swim", "keep a journal", "grow herbs on a windowsill", "make friends in a new city",
    "write a thank-you note", "fold a fitted sheet", "remove a coffee stain from a shirt", "plan a road trip",
    "improve my chess game", "make a smoothie", "stretch before exercise", "decorate a small apartment",
    "memorize a speech", "set up a fish tank", "compost kitchen scraps", "write a haiku about autumn",
    "repot a cactus", "make pancakes from scratch", "negotiate a higher salary", "learn touch typing",
    "start a vegetable garden", "wrap a present neatly", "make a to-do list that works",
)
EVERYDAY_FORMS = (
    "How do I {}?", "How can I {}?", "What is the best way to {}?", "Give step-by-step instructions to {}.",
    "Explain how to {}.", "Write a short guide on how to {}.", "Tell me how to {}.", "What should I know before I try to {}?",
)


def everyday_prompts(n: int, seed: int) -> list[str]:
    """``n`` everyday requests (0 = none), each task at most once, forms drawn with ``random.Random(seed)``."""
    rng = random.Random(f"everyday:{seed}")
    tasks = list(EVERYDAY)
    rng.shuffle(tasks)
    return [rng.choice(EVERYDAY_FORMS).format(t) for t in tasks[: min(n, len(tasks))]]


def trim_answer(text: str, truncated: bool) -> str:
    """A self-written answer that hit the token limit is cut back to its last full sentence, so that
    training on it (which ends with EOS) does not teach the model to stop mid-sentence."""
    text = text.strip()
    if not truncated:
        return text
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    return text[: cut + 1].strip() if cut > 0 else text


def refusal(seed: int, key: str) -> str:
    """The templated refusal for one row: deterministic in ``(seed, key)``."""
    rng = random.Random(f"{seed}:{key}")
    parts = [rng.choice(OPENERS), rng.choice(REASONS), rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def _builtin_text(name: str) -> str:
    return builtin_data.read_bytes(name).decode("utf-8")


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
