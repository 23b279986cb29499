"""Eval run directories and the statistics they report.

A run directory holds (docs/design.md, "Evaluation definitions"):
- ``results.json``: ``{"config": ..., "versions": ..., "results": {task: {metric: value,
  "<metric>_stderr": se}}, ...}``; extra top-level keys (``data``, ``model``, ``notes``...) are allowed.
- ``samples.jsonl``: one JSON object per evaluated item (every prompt, response and judge output).
- ``report.md``: a short human summary.
It is written atomically (``manifest.atomic_dir``): a crash leaves no half-written run.

Statistics are pure functions over plain lists. ``stderr`` is the *sample* standard error
``s / sqrt(n)`` with ``s`` the standard deviation with ``n - 1`` in the denominator; it is None
for fewer than two values.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..core import manifest
from ..core.data import DataSpec, load_records
from ..core.errors import HarmpruneError

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"


# ---------------------------------------------------------------- statistics (pure)


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if len(xs) else None


def stderr(xs: Sequence[float]) -> float | None:
    """Sample standard error of the mean: ``sqrt(Σ(x - x̄)² / (n - 1)) / sqrt(n)``; None when n < 2."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def summarize(xs: Sequence[float], name: str) -> dict:
    """``{name: mean, name_stderr: se}`` (None values when empty / too few)."""
    return {name: mean(xs), f"{name}_stderr": stderr(xs)}


def _replicates(xs: Sequence, stat: Callable[[Sequence], float | None], n_boot: int, seed: int) -> list[float]:
    """``stat`` of ``n_boot`` resamples of ``xs`` with replacement (``random.Random(seed)``), None values dropped."""
    rng, n = random.Random(seed), len(xs)
    return [v for v in (stat([xs[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot)) if v is not None]


def bootstrap_ci(xs: Sequence, stat: Callable[[Sequence], float | None] = mean, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap ``(lo, hi)`` interval of ``stat`` (resampling items with replacement)."""
    vals = sorted(_replicates(xs, stat, n_boot, seed)) if len(xs) else []
    if not vals:
        return None, None
    lo = vals[min(len(vals) - 1, max(0, int(math.floor(alpha / 2 * len(vals)))))]
    hi = vals[min(len(vals) - 1, max(0, int(math.ceil((1 - alpha / 2) * len(vals))) - 1))]
    return lo, hi


def bootstrap_stderr(xs: Sequence, stat: Callable[[Sequence], float | None], n_boot: int = 200,
                     seed: int = 0) -> float | None:
    """Standard deviation of ``stat`` over bootstrap resamples (for statistics with no closed form, e.g. AUC)."""
    vals = _replicates(xs, stat, n_boot, seed) if len(xs) >= 2 else []
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# ---------------------------------------------------------------- subsampling


def subsample(items: list, limit: int, seed: int, key: Callable | None = None) -> list:
    """Up to ``limit`` items (0 = all), spread over the groups of ``key`` (e.g. category or label).

    Each group is shuffled with ``random.Random(seed)``, then groups are taken round-robin (groups in
    order of first appearance), so a small limit still covers every group; the chosen items keep
    their original order.
    """
    if not limit or limit >= len(items):
        return list(items)
    rng = random.Random(seed)
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it) if key else None, []).append(i)
    for idx in groups.values():
        rng.shuffle(idx)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for idx in groups.values():
            if depth < len(idx) and len(chosen) < limit:
                chosen.append(idx[depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def draw_distinct(items: list, limit: int, seed: int, key: Callable | None = None,
                  prompt: Callable = lambda r: r.prompt) -> list:
    """Up to ``limit`` items with pairwise distinct prompts (0 = one per distinct prompt), spread over
    the groups of ``key`` (:func:`subsample`): each prompt keeps one of its items, a seeded choice.

    Data with several reference replies per prompt would otherwise give repeated prompts, identical
    greedy replies and too narrow bootstrap intervals (the bootstrap must resample prompts)."""
    rng = random.Random(seed)
    by_prompt: dict = {}
    for i, it in enumerate(items):
        by_prompt.setdefault(prompt(it), []).append(i)
    keep = sorted(idx[rng.randrange(len(idx))] for idx in by_prompt.values())
    return subsample([items[i] for i in keep], limit, seed, key=key)


def draw(rows: list, n: int, seed: int) -> list:
    """``n`` of ``rows`` (0 = all): a seeded draw spread over their distinct prompts (the first rows of a
    file often share one prompt), in source order."""
    return subsample(rows, n, seed, key=lambda r: " ".join(r.prompt.split()).lower())


def held_out(data: str, n: int, seed: int = 0):
    """``n`` records of a held-out set (0 = all), drawn by :func:`draw`."""
    return draw(load_records(DataSpec(data=data)), n, seed)


# ---------------------------------------------------------------- files


def _json_ready(obj):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


def results_doc(config: dict, results: dict, **extra) -> dict:
    """The ``results.json`` object: config, versions, results, then any extra sections."""
    return _json_ready({"config": config, "versions": manifest.versions(), "results": results, **extra})


def write_run(out: str | Path, doc: dict, samples: Iterable[dict], report: str, overwrite: bool = False,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write results.json, samples.jsonl and report.md (and ``extra_files`` {name: text}) atomically."""
    with manifest.atomic_dir(out, overwrite) as tmp:
        manifest.write_json(tmp / RESULTS_FILE, doc)
        with (tmp / SAMPLES_FILE).open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(_json_ready(s), ensure_ascii=False, default=str) + "\n")
        (tmp / REPORT_FILE).write_text(report, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def read_results(path: str | Path) -> dict:
    """``results.json`` of a run directory (or the file itself)."""
    p = Path(path)
    f = p / RESULTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise HarmpruneError(f"{path}: no {RESULTS_FILE} (not an eval run directory)")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HarmpruneError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise HarmpruneError(f"{f}: has no 'results' object")
    return doc


def read_rows(path: str | Path, required: Sequence[str], flag: str = "--responses",
              present: Sequence[str] = ()) -> tuple[list[dict], str]:
    """The rows of a ``.jsonl``, ``.json`` (a list of objects) or ``.csv`` file (each optionally ``.gz``),
    every field kept, and the file's sha256. A missing file, an unreadable row, a row without a
    ``required`` text field or a ``present`` field, or an empty file ends in one line naming the file,
    row and field."""
    import csv
    import gzip
    import hashlib
    import io

    p = Path(path)
    if not p.is_file():
        raise HarmpruneError(f"{flag} {path}: no such file")
    raw = p.read_bytes()
    suffix = Path(p.name.removesuffix(".gz")).suffix
    try:
        text = (gzip.decompress(raw) if p.name.endswith(".gz") else raw).decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError):
        raise HarmpruneError(f"{flag} {path}: not UTF-8 text (or a broken .gz)") from None
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        elif suffix == ".json":
            rows = json.loads(text)
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise HarmpruneError(f"{flag} {path}: line {i} is not JSON ({e.msg})") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise HarmpruneError(f"{flag} {path}: not a readable {suffix or 'jsonl'} file ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise HarmpruneError(f"{flag} {path}: no rows")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise HarmpruneError(f"{flag} {path}: row {i} is not an object")
        for f in present:
            if f not in r:
                raise HarmpruneError(f"{flag} {path}: row {i} has no field {f!r}")
        for f in required:
            if not isinstance(r.get(f), str):
                raise HarmpruneError(f"{flag} {path}: row {i} has no text field {f!r}")
    return rows, hashlib.sha256(raw).hexdigest()


def read_samples(path: str | Path) -> list[dict]:
    p = Path(path)
    f = p / SAMPLES_FILE if p.is_dir() else p
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- report helpers


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def value_cell(metrics: dict, name: str) -> str:
    """``mean ± stderr`` when the metric has a stderr, else the value."""
    se = metrics.get(f"{name}_stderr")
    v = fmt(metrics.get(name))
    return f"{v} ± {fmt(se)}" if se is not None else v


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(results: dict) -> str:
    """One markdown table of every task and metric (stderrs folded into their metric's cell)."""
    rows = []
    for task, metrics in results.items():
        for name in metrics:
            if not name.endswith("_stderr"):
                rows.append([task, name, value_cell(metrics, name)])
    return md_table(["task", "metric", "value"], rows)
