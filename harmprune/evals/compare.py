"""``harmprune compare RUN_DIR...``: several eval runs side by side, with deltas against the first.

Rows are (task, metric) pairs in order of first appearance over the runs (``*_stderr`` metrics are
folded into their metric's cell as ``value ± se``); after the baseline column, each run has its
value column and a ``Δ`` column (run − baseline; empty when either side is missing).
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.settings import check, opt
from . import results as R

COUNT_METRICS = ("samples", "scored", "refusal_judged", "errors", "tokens", "blocks", "skipped", "harmful", "benign")


def run_label(path: str, taken: set[str]) -> str:
    """A short unique column name for a run (its directory name, parent added when ambiguous)."""
    p = Path(path).resolve()
    if p.name == R.RESULTS_FILE:
        p = p.parent
    name = p.name
    if name in taken:
        name = f"{p.parent.name}/{p.name}"
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def delta(base, other) -> float | None:
    if not isinstance(base, (int, float)) or not isinstance(other, (int, float)):
        return None
    return other - base


def compare_rows(docs: list[dict], include: list[str] | None = None, counts: bool = False) -> list[tuple[str, str]]:
    """The (task, metric) rows: union over runs, first-appearance order; ``include`` = task globs."""
    rows: dict = {}
    for d in docs:
        for task, metrics in d["results"].items():
            if include and not any(fnmatch.fnmatchcase(task, g) for g in include):
                continue
            for m, v in metrics.items():
                if m.endswith("_stderr") or not isinstance(v, (int, float, type(None))):
                    continue
                if not counts and m in COUNT_METRICS:
                    continue
                rows.setdefault((task, m), None)
    return list(rows)


def compare_table(docs: list[dict], labels: list[str], include: list[str] | None = None, counts: bool = False) -> str:
    """The markdown table: task, metric, baseline, then value and Δ per further run."""
    header = ["task", "metric", labels[0]]
    for lab in labels[1:]:
        header += [lab, f"Δ {lab}"]
    body = []
    for task, m in compare_rows(docs, include, counts):
        metrics = [d["results"].get(task, {}) for d in docs]
        base = metrics[0].get(m)
        row = [task, m, R.value_cell(metrics[0], m) if m in metrics[0] else "–"]
        for other in metrics[1:]:
            d = delta(base, other.get(m))
            row += [R.value_cell(other, m) if m in other else "–", "" if d is None else f"{d:+.3f}"]
        body.append(row)
    return R.md_table(header, body)


@dataclass
class CompareConfig:
    """Settings of ``harmprune compare`` (``runs`` is the positional argument)."""

    runs: list[str] = opt([], help="eval run directories (or results.json files); the first is the baseline", role="input")
    report: str | None = opt(None, help="also write the table to this markdown file", deprecated=("--out",), role="output")
    tasks: list[str] = opt([], help="only tasks matching these globs (e.g. 'harm/*' 'utility/*_nll')")
    counts: bool = opt(False, help="also show count rows (samples, errors, tokens...)")

    def __post_init__(self):
        check(bool(self.runs), "compare needs at least one run directory")


def compare(cfg: CompareConfig) -> str:
    """Read the runs, return (and print, and optionally write) the markdown table."""
    docs = [R.read_results(r) for r in cfg.runs]
    taken: set[str] = set()
    labels = [run_label(r, taken) for r in cfg.runs]
    lines = ["# harmprune compare", "", f"Baseline: `{cfg.runs[0]}`; Δ = run − baseline.", ""]
    lines += [f"- `{lab}`: {d.get('config', {}).get('model', '?')} ({run})" for lab, d, run in zip(labels, docs, cfg.runs)]
    text = "\n".join(lines) + "\n\n" + compare_table(docs, labels, cfg.tasks or None, cfg.counts)
    sys.stdout.write(text)
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(text, encoding="utf-8")
    return text
