"""``make prune``: score harmful and benign data (cached), prune, and show the before/after table.

One model handle serves every step (its hash is computed once). Scores go through the one score
cache (``attribution.cache``), so re-running with other ``q``/``p`` re-uses them, and so can
``sweep`` and ``ablate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..attribution.cache import cached_scores
from ..core import manifest, validate
from ..core.data import DataSpec, load_records
from ..core.models import ModelHandle, load_model, model_name
from ..core.options import (BenignOptions, CacheOptions, EvalSetOptions,  # noqa: F401
                            HarmDataOptions, MethodOptions, ModelOptions, OutputOptions, PresetOptions, ScopeOptions,
                            ScoringOptions,
                            SelectionOptions, check_scoring, check_selection)
from ..core.settings import check, to_dict
from ..evals.nll import response_nll
from ..pruning.apply import masked
from ..pruning.checkpoint import load_scores
from ..pruning.select import random_control, select_prune_set


@dataclass(kw_only=True)
class PruneInputs(ModelOptions, HarmDataOptions, BenignOptions, MethodOptions, ScopeOptions, ScoringOptions,
                  CacheOptions, EvalSetOptions, OutputOptions, PresetOptions):
    """Model, data, score methods, scoring settings and held-out sets shared by ``pipeline`` and ``sweep``."""

    def __post_init__(self):
        check_scoring(self)
        check(self.eval_nsamples >= 0, "--eval-nsamples must be 0 (all) or positive")


@dataclass(kw_only=True)
class PipelineConfig(PruneInputs, SelectionOptions):
    """Settings of ``harmprune pipeline`` (``make prune``); ``--out`` defaults to out/<model>-<settings>."""

    def __post_init__(self):
        super().__post_init__()
        check_selection(self)

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-q{self.q:g}-p{self.p:g}-{self.scope}-n{self.nsamples}"
        return Path("out") / f"{model_name(self.model)}-{tag}"


def held_out(data: str, n: int):
    """The first ``n`` records of a held-out set (0 = all)."""
    rows = load_records(DataSpec(data=data))
    return rows[:n] if n else rows


def nll_row(model, tok, harm_rows, benign_rows, s) -> dict:
    kw = dict(fmt=s.format, max_length=s.max_length, batch_size=max(8, s.batch_size))
    return {"harmful_nll": response_nll(model, tok, harm_rows, desc="nll harmful", **kw)["nll"],
            "benign_nll": response_nll(model, tok, benign_rows, desc="nll benign", **kw)["nll"]}


def with_deltas(row: dict, base: dict) -> dict:
    """Add NLL increases over ``base`` (nats/token) and harm-specificity = Δharmful / Δbenign."""
    dh, db = row["harmful_nll"] - base["harmful_nll"], row["benign_nll"] - base["benign_nll"]
    return {**row, "d_harmful": dh, "d_benign": db, "benign_rel": db / base["benign_nll"],
            "specificity": dh / db if db > 0 else (float("inf") if dh > 0 else float("nan"))}


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'model':<10} {'pruned':>8} {'harmful NLL':>12} {'Δ':>8} {'benign NLL':>11} {'Δ':>8} {'Δh/Δb':>7}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r.get('pruned', 0):>8} {r['harmful_nll']:>12.4f} {r.get('d_harmful', 0):>+8.4f} "
                     f"{r['benign_nll']:>11.4f} {r.get('d_benign', 0):>+8.4f} {r.get('specificity', float('nan')):>7.2f}")
    return "\n".join(lines)


def score_pair(handle: ModelHandle, cfg: PruneInputs, need_benign: bool = True):
    """The harm and benign scores of ``cfg`` (through the score cache), read lazily: ``(harm, benign|None)``."""
    harm = load_scores(cached_scores(handle, cfg.harm, cfg.method, cfg, cfg.scores_dir), lazy=True)
    benign = load_scores(cached_scores(handle, cfg.benign, cfg.benign_method, cfg, cfg.scores_dir), lazy=True) \
        if need_benign else None
    return harm, benign


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Score (cached), prune, save ``cfg.out_dir()``, and print/write the before/after NLL table."""
    from ..pruning.prune import PruneConfig, prune_loaded

    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    for w in validate.fraction_warnings(cfg.q, cfg.p):
        validate.warn(w)
    manifest.banner("pipeline", {**to_dict(cfg), "out": str(out)})
    handle = load_model(cfg.model, cfg.dtype, cfg.device)
    model, tok = handle
    harm, benign = score_pair(handle, cfg, need_benign=cfg.p > 0)
    harm_rows, benign_rows = held_out(cfg.eval_harm, cfg.eval_nsamples), held_out(cfg.eval_benign, cfg.eval_nsamples)

    base = nll_row(model, tok, harm_rows, benign_rows, cfg)
    mask, stats = select_prune_set(harm.tensors, benign.tensors if benign else None, harm.method,
                                   benign.method if benign else None, cfg.q, cfg.p, cfg.scope)
    rand = random_control(mask, cfg.seed)  # what select_prune_set(..., "random") gives, without re-selecting
    rows = {"original": {**base, "pruned": 0}}
    for name, m in (("pruned", mask), ("random", rand)):
        with masked(model, m):
            rows[name] = {**with_deltas(nll_row(model, tok, harm_rows, benign_rows, cfg), base),
                          "pruned": stats["total_pruned"]}
    table = {"eval": {"harmful": cfg.eval_harm, "benign": cfg.eval_benign, "rows": [len(harm_rows), len(benign_rows)],
                      "metric": "mean response NLL, nats/token"}, "rows": rows}
    prune_cfg = PruneConfig(harm_scores=str(harm.path), benign_scores=str(benign.path) if benign else None, q=cfg.q,
                            p=cfg.p, out=str(out), model=cfg.model, scope=cfg.scope, seed=cfg.seed,
                            overwrite=cfg.overwrite, dtype=cfg.dtype, device=handle.device)
    prune_loaded(prune_cfg, handle, harm, benign, mask, stats, extra={"before_after": table})
    text = format_table(rows)
    print(f"\nheld-out NLL ({len(harm_rows)} harmful, {len(benign_rows)} benign; nats/token)\n{text}")
    (out / "before_after.md").write_text("```\n" + text + "\n```\n")
    return out
