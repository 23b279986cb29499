"""``make prune``: score harmful and benign data (cached), prune, and show the before/after table.

With ``--headline`` (``make prune`` on the aligned organism) it also measures B-TAP's headline for the
original, the pruned model and the random control (``evals/headline.py``: judged generation without
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

from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.models import load_model, model_name
from ..core.options import (GenBatchOptions, GenCacheOptions, HarmJudgeOptions, HeadlineOptions, JudgeOptions,
                            LimitOptions, NewTokensOptions, PruneInputs, SelectionOptions, check_selection, needs_benign,
                            pick)
from ..core.settings import check, to_dict
from ..evals import headline
from ..evals.gencache import GenCache, cache_dir
from ..evals.eval_prompts import prompts_of
from ..evals.harm import judge_options, judge_specs
from ..evals.nll import nll_pair, with_deltas
from ..evals.results import draw
from ..pruning.apply import masked
from ..pruning.harmset import harm_set, score_pair
from ..pruning.select import random_control


@dataclass(kw_only=True)
class PipelineConfig(PruneInputs, SelectionOptions, HeadlineOptions, HarmJudgeOptions, JudgeOptions, LimitOptions,
                     NewTokensOptions, GenBatchOptions, GenCacheOptions):
    """Settings of ``harmprune pipeline`` (``make prune``); ``--out`` defaults to out/<model>-<settings>.
    ``--headline`` adds B-TAP's headline (evals/headline.py) on ``--limit`` of the ``--eval-harm``
    prompts (reference replies feed the prefill attack) and as many held-out XSTest safe prompts,
    judged by ``--judge``; the other flags of that group only matter with ``--headline``. The headline's
    judged replies go through the judged-generation cache (``--gen-cache-dir``, evals/gencache.py):
    another ``q`` or ``p`` re-uses the original model's."""

    def __post_init__(self):
        super().__post_init__()
        check_selection(self)
        check(self.limit >= 0, "--limit must be 0 (all) or positive")
        if self.headline:
            pick(headline.HeadlineConfig, self)  # its checks (--prefill-attack, --max-new-tokens, ...), before any work
            judge_specs(self.judge)  # unknown judges fail here, not after scoring
            headline.extra_sets(self.eval_harm_extra)  # a missing --eval-harm-extra set fails here too

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-q{self.q:g}-p{self.p:g}-{self.scope}-n{self.nsamples}"
        return Path("out") / f"{model_name(self.model)}-{tag}"


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'model':<10} {'pruned':>8} {'harmful NLL':>12} {'Δ':>8} {'benign NLL':>11} {'Δ':>8} {'Δh/Δb':>7}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r.get('pruned', 0):>8} {r['harmful_nll']:>12.4f} {r.get('d_harmful', 0):>+8.4f} "
                     f"{r['benign_nll']:>11.4f} {r.get('d_benign', 0):>+8.4f} {r.get('specificity', float('nan')):>7.2f}")
    return "\n".join(lines)


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

    mask, stats = harm_set(harm, benign, cfg.q, cfg.p, cfg.scope, cfg.selection)
    rand = random_control(mask, cfg.seed)  # what select_prune_set(..., "random") gives, without re-selecting
    variants = {"original": None, "pruned": mask, "random": rand}
    nll, hc = {}, pick(headline.HeadlineConfig, cfg) if cfg.headline else None

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
                                      extra=cfg.eval_harm_extra, exclude=prompts_of(cfg.harm, cfg.benign))
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
    prune_cfg = pick(PruneConfig, cfg, harm_scores=str(harm.path), benign_scores=str(benign.path) if benign else None,
                     out=str(out), device=handle.device)
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
