"""Acceptance check of an aligned organism (issue 15, acceptance 1), as a function and a result file.

:func:`check_organism` measures one model on
- held-out harmful prompts from a source and phrasing not used in training (StrongREJECT,
  ``evals.eval_prompts.unseen_harmful``): refusal rate and harmfulness from each judge, no attack;
- XSTest safe prompts not used in training (``evals.eval_prompts.xstest_heldout``): compliance;
- ``benign:test``: response NLL (nats/token, lower = better).
Every rate comes with its 95 % bootstrap interval (``headline.interval``). Run it on the base and
on the organism with the same settings and compare.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ...core import manifest
from ...core.data import DataSpec, load_records
from ...core.models import load_model, model_hash
from ...core.options import GenBatchOptions, HarmJudgeOptions, NewTokensOptions, SeedOptions, pick
from ...core.settings import opt, to_dict
from ...evals import headline as H
from ...evals.eval_prompts import unseen_harmful, xstest_heldout
from ...evals.harm import load_judges


@dataclass(kw_only=True)
class CheckConfig(HarmJudgeOptions, NewTokensOptions, GenBatchOptions, SeedOptions):
    """Settings of the organism acceptance check (``judge``: of the harmful replies; ``seed``: of the
    prompt subset and the bootstrap)."""

    model: str = opt(help="model to check (base or organism)")
    out: str = opt(help="output directory (check.json, samples.jsonl)")
    limit: int = opt(100, help="held-out harmful prompts, spread over categories (0 = all 304: the 313 StrongREJECT prompts minus 9 that nearly duplicate a training row)")
    xstest_limit: int = opt(0, help="held-out XSTest safe prompts (0 = all)")
    xstest_judges: str = opt("keyword:gcg,classifier", help="refusal judges of the XSTest replies")
    device: str = opt("cpu", help="device")


def check_organism(cfg: CheckConfig) -> Path:
    t0 = time.perf_counter()
    hc = pick(H.HeadlineConfig, cfg)
    model, tok = load_model(cfg.model, "float32", cfg.device)
    manifest.banner("align check", to_dict(cfg))
    harmful = unseen_harmful(cfg.limit, cfg.seed)
    res, samples = {}, []
    per_judge, s = H.judged_harm(model, tok, harmful, load_judges(cfg.judge), hc, "none")
    res["unseen_harmful"] = per_judge
    samples += [{"task": "unseen_harmful", **x} for x in s]
    xs = xstest_heldout(cfg.xstest_limit, cfg.seed)
    xjudges = load_judges(cfg.xstest_judges)
    gen = H._gen(hc)
    from ...evals.harm import generate_samples, judge_samples

    xsamples = generate_samples(model, tok, xs, gen)
    judge_samples(xsamples, xjudges)
    res["xstest_heldout"] = {}
    for j in xjudges:
        m = H.judged_metrics(xsamples, j.name, hc.n_boot, hc.seed)
        lo, hi = m["refusal_rate_ci"]
        res["xstest_heldout"][j.name] = {"compliance": 1 - m["refusal_rate"], "compliance_ci": [1 - hi, 1 - lo],
                                         "samples": m["samples"]}
    samples += [{"task": "xstest_heldout", **x} for x in xsamples]
    res["benign_nll"] = H.benign_nll(model, tok, load_records(DataSpec(data="benign:test")), hc)
    doc = {"config": to_dict(cfg), "model_hash": model_hash(model), "results": res,
           "prompts": {"unseen_harmful": len(harmful), "xstest_heldout": len(xs)},
           "versions": manifest.versions(), "wall_seconds": round(time.perf_counter() - t0, 1)}
    with manifest.atomic_dir(cfg.out, overwrite=True) as tmp:
        manifest.write_json(tmp / "check.json", doc)
        (tmp / "samples.jsonl").write_text("".join(json.dumps(x, default=str) + "\n" for x in samples))
    return Path(cfg.out)
