"""``make prune``: score harmful and benign data (cached), prune, and show the before/after table.

With ``--headline`` (``make prune`` on the aligned organism) it also measures B-TAP's headline for the
original, the pruned model and the random control (``recipes/headline.py``: judged generation without
and under the prefill attack, XSTest compliance, corpus perplexity, 95 % intervals), re-using the NLL
table's benign measurement. One model handle serves every step (its hash is computed once). Scores
go through the one score cache (``attribution.cache``), so re-running with other ``q``/``p`` re-uses
them, and so can ``sweep``, ``compare-alignment`` and ``ablate``; the headline's judged replies go
through the judged-generation cache (``evals.gencache``), so such a re-run generates and judges only
the pruned model and the control again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..attribution.cache import cached_scores
from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.models import ModelHandle, load_model, model_name
from ..core.options import (BenignOptions, CacheOptions, EvalSetOptions, GenBatchOptions, GenCacheOptions,  # noqa: F401
                            HarmDataOptions, HarmJudgeOptions, JudgeOptions, HeadlineOptions, LimitOptions, MethodOptions,
                            ModelOptions, NewTokensOptions, OutputOptions, PresetOptions, ScopeOptions,
                            ScoringOptions, SelectionOptions, check_scoring, check_selection, needs_benign)
from ..core.settings import check, to_dict
from ..evals.gencache import GenCache, cache_dir
from ..evals.harm import judge_options, judge_specs
from ..evals.nll import response_nll
from ..pruning.apply import masked
from ..pruning.checkpoint import load_scores
from ..pruning.select import random_control, select_prune_set
from . import headline


@dataclass(kw_only=True)
class PruneInputs(ModelOptions, HarmDataOptions, BenignOptions, MethodOptions, ScopeOptions, ScoringOptions,
                  CacheOptions, EvalSetOptions, OutputOptions, PresetOptions):
    """Model, data, score methods, scoring settings and held-out sets shared by ``pipeline`` and ``sweep``."""

    def __post_init__(self):
        check_scoring(self)
        check(self.eval_nsamples >= 0, "--eval-nsamples must be 0 (all) or positive")


@dataclass(kw_only=True)
class PipelineConfig(PruneInputs, SelectionOptions, HeadlineOptions, HarmJudgeOptions, JudgeOptions, LimitOptions,
                     NewTokensOptions, GenBatchOptions, GenCacheOptions):
    """Settings of ``harmprune pipeline`` (``make prune``); ``--out`` defaults to out/<model>-<settings>.
    ``--headline`` adds B-TAP's headline (recipes/headline.py) on ``--limit`` of the ``--eval-harm``
    prompts (reference replies feed the prefill attack) and as many held-out XSTest safe prompts,
    judged by ``--judge``; the other flags of that group only matter with ``--headline``. The headline's
    judged replies go through the judged-generation cache (``--gen-cache-dir``, evals/gencache.py):
    another ``q`` or ``p`` re-uses the original model's."""

    def __post_init__(self):
        super().__post_init__()
        check_selection(self)
        check(self.limit >= 0, "--limit must be 0 (all) or positive")
        if self.headline:
            headline.config_from(self)  # its checks (--prefill-attack, --max-new-tokens, ...), before any work
            judge_specs(self.judge)  # unknown judges fail here, not after scoring
            headline.extra_sets(self.eval_harm_extra)  # a missing --eval-harm-extra set fails here too

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-q{self.q:g}-p{self.p:g}-{self.scope}-n{self.nsamples}"
        return Path("out") / f"{model_name(self.model)}-{tag}"


def draw(rows: list, n: int, seed: int) -> list:
    """``n`` of ``rows`` (0 = all): a seeded draw spread over their distinct prompts (the first rows of a
    file often share one prompt), in source order."""
    from ..evals.results import subsample

    return subsample(rows, n, seed, key=lambda r: " ".join(r.prompt.split()).lower())


def held_out(data: str, n: int, seed: int = 0):
    """``n`` records of a held-out set (0 = all), drawn by :func:`draw`."""
    return draw(load_records(DataSpec(data=data)), n, seed)


def nll_pair(model, tok, harm_rows, benign_rows, s) -> tuple[dict, dict]:
    """``response_nll`` of the held-out harmful and benign rows (settings ``s``: format, max length, batch)."""
    kw = dict(fmt=s.format, max_length=s.max_length, batch_size=max(8, s.batch_size))
    return (response_nll(model, tok, harm_rows, desc="nll harmful", **kw),
            response_nll(model, tok, benign_rows, desc="nll benign", **kw))


def nll_row(model, tok, harm_rows, benign_rows, s) -> dict:
    h, b = nll_pair(model, tok, harm_rows, benign_rows, s)
    return {"harmful_nll": h["nll"], "benign_nll": b["nll"]}


def specificity(d_harmful: float, d_benign: float) -> float:
    """Harm-specificity Δharmful / Δbenign (inf when only the harmful NLL rose, nan when neither did)."""
    return d_harmful / d_benign if d_benign > 0 else (float("inf") if d_harmful > 0 else float("nan"))


def with_deltas(row: dict, base: dict) -> dict:
    """Add NLL increases over ``base`` (nats/token) and harm-specificity = Δharmful / Δbenign."""
    dh, db = row["harmful_nll"] - base["harmful_nll"], row["benign_nll"] - base["benign_nll"]
    return {**row, "d_harmful": dh, "d_benign": db, "benign_rel": db / base["benign_nll"],
            "specificity": specificity(dh, db)}


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
    """Score (cached), prune, save ``cfg.out_dir()``, and print/write the before/after NLL table; with
    ``--headline`` also the headline's ``results.json``, ``table.md`` and ``headline.png``."""
    from ..pruning.prune import PruneConfig, prune_loaded

    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    for w in validate.fraction_warnings(cfg.q, cfg.p):
        validate.warn(w)
    manifest.banner("pipeline", {**to_dict(cfg), "out": str(out)})
    handle = load_model(cfg.model, cfg.dtype, cfg.device)
    model, tok = handle
    harm, benign = score_pair(handle, cfg, need_benign=needs_benign(cfg))
    hspec, bspec = DataSpec(data=cfg.eval_harm), DataSpec(data=cfg.eval_benign)
    harm_all, benign_all = load_records(hspec), load_records(bspec)
    harm_rows, benign_rows = draw(harm_all, cfg.eval_nsamples, cfg.seed), draw(benign_all, cfg.eval_nsamples, cfg.seed)

    mask, stats = select_prune_set(harm.tensors, benign.tensors if benign else None, harm.method,
                                   benign.method if benign else None, cfg.q, cfg.p, cfg.scope, selection=cfg.selection)
    rand = random_control(mask, cfg.seed)  # what select_prune_set(..., "random") gives, without re-selecting
    variants = {"original": None, "pruned": mask, "random": rand}
    nll, hc = {}, headline.config_from(cfg) if cfg.headline else None

    measured = {}

    def measure_nll(name: str) -> dict:  # under the variant's mask; one benign NLL serves both tables
        h, b = nll_pair(model, tok, harm_rows, benign_rows, cfg)
        nll[name] = {"harmful_nll": h["nll"], "benign_nll": b["nll"]}
        measured.update(harmful=h["samples"], benign=b["samples"])
        return {"utility/benign_nll": headline.nll_summary(b, hc)} if hc else {}

    if hc:
        about = {"harmful": data_fingerprint(hspec, harm_all), "benign": {**data_fingerprint(bspec, benign_all),
                                                                          "selected": len(benign_rows)}}
        data = headline.held_out_data(tok, harm_rows, [], about, limit=cfg.limit, seed=cfg.seed,
                                      extra=cfg.eval_harm_extra)
        gdir = cache_dir(cfg.gen_cache_dir, cfg.scores_dir)
        results, samples = headline.measure_masks(model, tok, variants, data, hc, extra=measure_nll,
                                                  judge_opts=judge_options(cfg),
                                                  gen_cache=GenCache(gdir) if gdir else None,
                                                  model_hash=handle.hash, model_name=handle.name)
    else:
        for name, m in variants.items():
            with masked(model, m or {}):
                measure_nll(name)
    rows = {"original": {**nll["original"], "pruned": 0}}
    rows.update({name: {**with_deltas(nll[name], nll["original"]), "pruned": stats["total_pruned"]}
                 for name in ("pruned", "random")})
    table = {"eval": {"harmful": cfg.eval_harm, "benign": cfg.eval_benign, "rows": [measured["harmful"], measured["benign"]],
                      "metric": "mean response NLL, nats/token"}, "rows": rows}
    prune_cfg = PruneConfig(harm_scores=str(harm.path), benign_scores=str(benign.path) if benign else None, q=cfg.q,
                            p=cfg.p, out=str(out), model=cfg.model, scope=cfg.scope, seed=cfg.seed,
                            overwrite=cfg.overwrite, dtype=cfg.dtype, device=handle.device)
    prune_loaded(prune_cfg, handle, harm, benign, mask, stats, extra={"before_after": table})
    manifest.write_config(out, "pipeline", cfg, out=str(out))  # replay: harmprune pipeline --config
    text = format_table(rows)
    print(f"\nheld-out NLL ({measured['harmful']} harmful, {measured['benign']} benign; nats/token)\n{text}")
    (out / "before_after.md").write_text("```\n" + text + "\n```\n")
    if hc:
        results.update(model={"spec": cfg.model, "hash": handle.hash}, config=to_dict(cfg), before_after=table,
                       prune={k: stats[k] for k in ("total_pruned", "total_fraction") if k in stats},
                       versions=manifest.versions())
        more = "".join(f" + {len(r)} of {n}" for n, r in data.harmful_sets.items())
        print(f"\nheadline ({data.about['harmful']['selected']} held-out harmful prompts{more}, "
              f"{len(data.xstest)} XSTest safe prompts; 95 % bootstrap intervals)\n"
              + headline.write_headline(out, results, samples))
    return out
