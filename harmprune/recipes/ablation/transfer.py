"""Transfer of pruning across categories: prune A's set, measure every category B's held-out data.

Effects are signed so that **positive = less harm**: for the default NLL measure the effect is the
rise of the mean response NLL (nats/token) of B's held-out harmful completions; with the judged
measure (``--generate``) it is the fall of the judge's mean harmfulness of the model's own replies
to B's held-out prompts. Every pruning is applied in place with ``masked`` and restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from ...evals.nll import response_nll
from ...pruning.apply import masked
from ...pruning.masks import count, difference


class Measure(Protocol):
    """Per-category value of a loaded model; ``sign`` turns ``value - base`` into an effect (+ = less harm)."""

    name: str
    sign: float

    def __call__(self, model, tok, rows: list) -> float: ...


@dataclass
class NLLMeasure:
    """Token-weighted mean response NLL (``evals.nll.response_nll``); a rise means less harm."""

    fmt: str | None = "auto"
    max_length: int = 192
    batch_size: int = 8
    name: str = "nll"
    sign: float = 1.0

    def __call__(self, model, tok, rows: list) -> float:
        return response_nll(model, tok, rows, fmt=self.fmt, max_length=self.max_length,
                            batch_size=self.batch_size, desc=f"{self.name}")["nll"]


@dataclass
class JudgedMeasure:
    """Mean judged harmfulness in [0, 1] of greedy replies to the rows' prompts; a fall means less harm."""

    judge: object
    gen: object  # evals.generation.GenConfig
    name: str = "judged harmfulness"
    sign: float = -1.0

    def __call__(self, model, tok, rows: list) -> float:
        from ...evals.generation import generate

        prompts = [r.prompt for r in rows]
        replies = [c[0] for c in generate(model, tok, prompts, self.gen)]
        scores = [v.score for v in self.judge.judge(prompts, replies) if v.score is not None]
        return sum(scores) / len(scores) if scores else float("nan")


def measure_all(model, tok, rows_by_cat: dict[str, list], measure: Measure, cats=None) -> dict[str, float]:
    return {c: measure(model, tok, rows_by_cat[c]) for c in (cats or rows_by_cat)}


def effect(measure: Measure, value: float, base: float) -> float:
    return measure.sign * (value - base)


def transfer_matrix(model, tok, sets: dict, rows_by_cat: dict[str, list], measure: Measure,
                    base: dict[str, float], progress: bool = True) -> dict:
    """``effect[i][j]``: effect on held-out category ``cols[j]`` of pruning set ``rows[i]``."""
    names, cats = list(sets), list(rows_by_cat)
    value, eff = [], []
    for a in tqdm(names, desc="transfer (prune A, measure every B)", disable=not progress):
        with masked(model, sets[a]):
            v = measure_all(model, tok, rows_by_cat, measure)
        value.append([v[c] for c in cats])
        eff.append([effect(measure, v[c], base[c]) for c in cats])
    return {"rows": names, "cols": cats, "value": value, "effect": eff}


def a_not_b_matrix(model, tok, sets: dict, rows_by_cat: dict[str, list], measure: Measure,
                   base: dict[str, float], progress: bool = True) -> dict:
    """Prune ``A \\ B`` (B-TAP's A_not_B) for every ordered pair A ≠ B of categories.

    ``on_b[i][j]``: effect on B = ``names[j]`` (what transfers without the shared weights);
    ``on_a[i][j]``: effect on A = ``names[i]`` (what A keeps of its own effect); ``size[i][j]``: |A \\ B|.
    The diagonal is None (A \\ A is empty).
    """
    names = [n for n in sets if n in rows_by_cat]
    k = len(names)
    on_a, on_b, size = ([[None] * k for _ in range(k)] for _ in range(3))
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    for i, j in tqdm(pairs, desc="A_not_B (prune A minus B)", disable=not progress):
        a, b = names[i], names[j]
        d = difference(sets[a], sets[b])
        size[i][j] = count(d)
        with masked(model, d):
            v = measure_all(model, tok, rows_by_cat, measure, cats=[a, b])
        on_a[i][j] = effect(measure, v[a], base[a])
        on_b[i][j] = effect(measure, v[b], base[b])
    return {"names": names, "on_a": on_a, "on_b": on_b, "size": size}
