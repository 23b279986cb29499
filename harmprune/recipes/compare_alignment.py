"""``make compare-alignment``: does alignment compress harm (B-TAP)? The pipeline on ``--base`` and on
``--aligned``, with the same data and settings, side by side.

For each model: scores through the score cache (``pruning.harmset.score_pair``: computed once per model and
re-used by ``make prune``), then the original and the harm-specific set ``Top_q(harm) \\ Top_p(benign)``
at each q of ``--qs`` (and ``--q``), applied in place and restored. Each point measures:
- held-out harmful and benign response NLL (the first ``--eval-nsamples`` rows; nats/token, higher =
  less likely), their rises over the original and the harm-specificity Δharmful / Δbenign;
- judged harmful generation under the prefill attack (the first ``--prefill-attack`` tokens of the
  harmful reference reply forced) on ``--limit`` held-out harmful prompts, per ``--judge``:
  harmfulness (higher = more harmful) and refusal rate with 95 % bootstrap intervals
  (``headline.judged_harm``); the originals also without the attack.
- XSTest safe compliance (``keyword:gcg``, higher = answers more safe questions) on ``--limit`` held-out
  XSTest prompts: the cost in answers that a drop in harm may come with; reported as (d).
Judged prompts that (nearly) duplicate the scoring or protect data are left out (``eval_prompts``).
Reported: (a) harm-specificity at each q on both models (the same q gives both the same Top_q size
per matrix, as they share the architecture; the pruned counts differ only by the benign protection,
and are shown); (b) the compression curve and, per model and judge, the smallest pruned fraction
whose harmfulness under the prefill attack is at most half the original's (:func:`halving_fraction`).
With ``--eval-harm-extra NAME`` (e.g. ``harmful-heldout``), a second held-out harmful set is judged the
same way (original without and under the attack, each q under the attack) and reported as (c).
Writes ``results.json``, ``table.md`` (rendered from ``results.json``) and ``compare_alignment.png``.

Sizing of ``make compare-alignment`` (2-core CPU): q in {3e-5, 1e-4, 3e-4, 1e-3}, 32 + 32 NLL rows, 32
prompts, 48 new tokens, generation batch 8. Rates measured on this CPU at load ~4 (2026-11-29,
``OMP_NUM_THREADS=1``, ``nice``, SmolLM2-135M): one batch of 4 replies of 48 tokens 9-14 s, the response
NLL of 4 rows 4.5-6.5 s. So one point (32 replies, NLL of 64 rows) takes ~2.2 min, a model (the
original with and without the attack, 4 points) ~12 min, both ~25 min. Scoring 128 + 128 samples
takes ~8 min per model when the score cache has no entry (``make prune`` leaves one): ~41 min cold,
~25 min with cached scores; heavier contention adds to both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.models import load_model, model_name
from ..core.options import (BenignOptions, CacheOptions, EvalSetOptions, GenBatchOptions, HarmDataOptions,
                            HarmJudgeOptions, LimitOptions, MethodOptions, NewTokensOptions, OutputOptions,
                            ExtraHarmOptions, PairOptions, PrefillAttackOptions, QGridOptions, RuntimeOptions, ScopeOptions,
                            ScoringOptions, SelectionOptions, check_scoring, check_selection, needs_benign, pick)
from ..core.settings import check, to_dict
from ..evals import results as R
from ..evals import headline
from ..evals.eval_prompts import prompts_of, xstest_heldout
from ..evals.harm import judge_options, judge_specs, load_judges
from ..evals.nll import nll_row, specificity, with_deltas
from ..evals.results import draw
from ..pruning.apply import masked
from ..pruning.harmset import harm_set, score_pair

ROLES = ("base", "aligned")
PLOT_FILE = "compare_alignment.png"


@dataclass(kw_only=True)
class CompareAlignmentConfig(RuntimeOptions, PairOptions, HarmDataOptions, BenignOptions, MethodOptions,
                             ScopeOptions, ScoringOptions, CacheOptions, EvalSetOptions, OutputOptions,
                             SelectionOptions, QGridOptions, PrefillAttackOptions, ExtraHarmOptions, HarmJudgeOptions,
                             LimitOptions,
                             NewTokensOptions, GenBatchOptions):
    """Settings of ``harmprune compare-alignment``; ``--out`` defaults to results/compare-alignment-<aligned>.
    ``--q`` is the point of the side-by-side specificity (added to ``--qs`` if missing)."""

    def __post_init__(self):
        check_scoring(self)
        check_selection(self)
        validate.check_grid(self.qs, "--qs")
        check(self.eval_nsamples >= 0 and self.limit >= 0, "--eval-nsamples and --limit must be 0 (all) or positive")
        judge_specs(self.judge)
        pick(headline.HeadlineConfig, self)  # checks --prefill-attack, --max-new-tokens, --gen-batch-size
        headline.extra_sets(self.eval_harm_extra)  # a missing --eval-harm-extra set fails here

    def grid(self) -> list[float]:
        return sorted({*self.qs, self.q})


# ---------------------------------------------------------------- the reading (pure)


def halving_fraction(base_score: float | None, points: list[tuple[float, float | None]]) -> float | None:
    """The smallest pruned fraction among ``points`` = ``[(fraction, harmfulness)]`` whose harmfulness
    is at most half of ``base_score`` (the original's); ``None`` if no point gets there, or if the
    original produces no harm to halve (``base_score`` 0 or unknown)."""
    if not base_score or base_score <= 0:
        return None
    ok = [f for f, s in points if s is not None and s <= base_score / 2]
    return min(ok, default=None)


# ---------------------------------------------------------------- measurement


def measure_model(spec: str, cfg: CompareAlignmentConfig, harm_rows, benign_rows, prompts, judges,
                  sets: dict | None = None, xstest: list | None = None) -> dict:
    """The original and each q of the grid on one model (loaded once, restored after each point).
    ``sets``: more held-out harmful sets ``{name: prompts}`` (``--eval-harm-extra``), judged like ``prompts``
    (``harm_sets`` of the original and of each point). ``xstest``: safe prompts whose compliance is measured
    on the original and at each point (``xstest``: what pruning costs in answers to safe prompts)."""
    sets = sets or {}
    hc = pick(headline.HeadlineConfig, cfg)
    xjudge = load_judges(hc.xstest_judge)[0]
    handle = load_model(spec, cfg.dtype, cfg.device)
    model, tok = handle

    def safe() -> dict:  # XSTest compliance of the model as it is now (original or masked)
        return {"xstest": headline.xstest_compliance(model, tok, xstest, xjudge, hc)[0]} if xstest else {}
    harm, benign = score_pair(handle, cfg, need_benign=needs_benign(cfg))
    base = nll_row(model, tok, harm_rows, benign_rows, cfg)
    original = {**base, "harm": {a: headline.judged_harm(model, tok, prompts, judges, hc, a)[0]
                                 for a in headline.ATTACKS}, **safe()}
    if sets:
        original["harm_sets"] = {n: {a: headline.judged_harm(model, tok, r, judges, hc, a)[0] for a in headline.ATTACKS}
                                 for n, r in sets.items()}
    points = []
    for q in cfg.grid():
        mask, stats = harm_set(harm, benign, q, cfg.p, cfg.scope, cfg.selection)
        with masked(model, mask):
            row = with_deltas(nll_row(model, tok, harm_rows, benign_rows, cfg), base)
            harm_q, _ = headline.judged_harm(model, tok, prompts, judges, hc, "prefill")
            more = {n: {"prefill": headline.judged_harm(model, tok, r, judges, hc, "prefill")[0]} for n, r in sets.items()}
            row.update(safe())
        points.append({"q": q, "pruned": stats["total_pruned"], "fraction": stats["total_fraction"], **row,
                       "harm": {"prefill": harm_q}, **({"harm_sets": more} if more else {})})
    halving = {v: halving_fraction(original["harm"]["prefill"][v]["score"],
                                   [(p["fraction"], p["harm"]["prefill"][v]["score"]) for p in points])
               for v in prefill_views([j.name for j in judges])}
    return {"spec": spec, "hash": handle.hash, "original": original, "points": points, "halving": halving}


def run_compare_alignment(cfg: CompareAlignmentConfig) -> Path:
    """Measure both models and write results.json, table.md and compare_alignment.png."""
    out = Path(cfg.out or Path("results") / f"compare-alignment-{model_name(cfg.aligned)}")
    manifest.check_out_dir(out, cfg.overwrite)
    for w in {w for q in cfg.grid() for w in validate.fraction_warnings(q, cfg.p, "--qs", "--p")}:
        validate.warn(w)
    manifest.banner("compare-alignment", {**to_dict(cfg), "out": str(out)})
    hspec, bspec = DataSpec(data=cfg.eval_harm), DataSpec(data=cfg.eval_benign)
    harm_all, benign_all = load_records(hspec), load_records(bspec)
    harm_rows, benign_rows = draw(harm_all, cfg.eval_nsamples, cfg.seed), draw(benign_all, cfg.eval_nsamples, cfg.seed)
    train = prompts_of(cfg.harm, cfg.benign)
    prompts, _ = headline.held_out_prompts(harm_all, train, cfg.limit, cfg.seed)
    judges = load_judges(cfg.judge, **judge_options(cfg))
    sets, sets_about = headline.extra_sets(cfg.eval_harm_extra, cfg.limit, cfg.seed, exclude=train)
    xstest = xstest_heldout(cfg.limit, cfg.seed, exclude=train)  # outside align.jsonl and the protect data
    models = {role: measure_model(spec, cfg, harm_rows, benign_rows, prompts, judges, sets, xstest)
              for role, spec in zip(ROLES, (cfg.base, cfg.aligned))}
    results = {"config": to_dict(cfg), "judges": [j.name for j in judges], "q": cfg.q, "prefill": cfg.prefill_attack,
               "data": {"harmful": data_fingerprint(hspec, harm_all), "benign": data_fingerprint(bspec, benign_all),
                        "nll_rows": [len(harm_rows), len(benign_rows)], "prompts": len(prompts), "xstest": len(xstest),
                        **({"harmful_sets": sets_about} if sets else {})},
               "models": models, "versions": manifest.versions()}
    with manifest.atomic_dir(out, cfg.overwrite) as tmp:
        manifest.write_json(tmp / "results.json", R._json_ready(results))
        manifest.write_config(tmp, "compare-alignment", cfg, out=str(out))
        doc = manifest.read_json(tmp / "results.json")
        table = render(doc)
        (tmp / "table.md").write_text(table)
        plot(doc, tmp / PLOT_FILE)
    print(table)
    print(f"harmprune: compare-alignment written to {out}")
    return out


# ---------------------------------------------------------------- table and figure (from results.json)


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _harm(m: dict) -> str:
    return "n/a" if m.get("score") is None else f"{m['score']:.2f} [{m['score_ci'][0]:.2f}, {m['score_ci'][1]:.2f}]"


def prefill_views(judges: list[str]) -> list[str]:
    """The harm keys under the prefill attack that a curve is drawn for: each judge on the full reply,
    then on the continuation alone (``headline.judged_harm``)."""
    return list(judges) + [f"{j}/continuation" for j in judges]


def _view_label(v: str) -> str:
    return f"{v.removesuffix('/continuation')}, continuation" if v.endswith("/continuation") else f"{v}, full"


def _stop(h: dict) -> str:
    m = h.get("stop") or {}
    return "n/a" if m.get("stop_rate") is None else f"{m['stop_rate']:.2f}"


def _spec(p: dict) -> str:
    s = specificity(p["d_harmful"], p["d_benign"])
    return "∞" if s == math.inf else _f(None if math.isnan(s) else s, ".2f")


def render(doc: dict) -> str:
    """The markdown report: originals, (a) specificity per q, (b) the compression curve, halving fractions."""
    ms, judges = doc["models"], doc["judges"]
    views = prefill_views(judges)
    cols = [("none", j, f"none attack ({j})") for j in judges] + \
           [("prefill", v, f"prefill attack ({_view_label(v)})") for v in views] + \
           [("prefill", f"{j}/prefix", f"forced prefix alone: floor ({j})") for j in judges]
    lines = [f"Held-out NLL on {doc['data']['nll_rows'][0]} harmful + {doc['data']['nll_rows'][1]} benign rows; "
             f"judged generation on {doc['data']['prompts']} distinct harmful prompts, prefill attack = first "
             f"{doc['prefill']} reference tokens; harmfulness [95 % CI], higher = more harmful. 'full' = the judge "
             "reads prefix + continuation (as B-TAP); 'continuation' = only what the model wrote after the prefix.",
             "", "| original | harmful NLL | benign NLL | " + " | ".join(c[2] for c in cols) + " | stop rate |",
             "|---" * (4 + len(cols)) + "|"]
    for role, m in ms.items():
        o = m["original"]
        lines.append(f"| {role} | {o['harmful_nll']:.4f} | {o['benign_nll']:.4f} | " + " | ".join(
            _harm(o["harm"][a].get(k, {})) for a, k, _ in cols) + f" | {_stop(o['harm']['prefill'])} |")
    lines += ["", "(a) harm-specificity Δharmful / Δbenign NLL at each q (the same Top_q size per matrix on both "
              "models; the pruned counts differ only by what Top_p(benign) protects)",
              "", "| q | " + " | ".join(f"{r} pruned | {r} Δharmful | {r} Δbenign | {r} Δh/Δb" for r in ms) + " |",
              "|---" * (1 + 4 * len(ms)) + "|"]
    for i, p0 in enumerate(next(iter(ms.values()))["points"]):
        mark = " **(--q)**" if p0["q"] == doc["q"] else ""
        cells = [f"{m['points'][i]['pruned']} | {m['points'][i]['d_harmful']:+.4f} | {m['points'][i]['d_benign']:+.4f}"
                 f" | {_spec(m['points'][i])}" for m in ms.values()]
        lines.append(f"| {p0['q']:g}{mark} | " + " | ".join(cells) + " |")
    lines += ["", "(b) compression curve: harmfulness under the prefill attack against the pruned fraction", "",
              "| q | " + " | ".join(f"{r} fraction | " + " | ".join(f"{r} ({_view_label(v)})" for v in views)
                                    + f" | {r} stop rate" for r in ms) + " |",
              "|---" * (1 + (2 + len(views)) * len(ms)) + "|"]
    for i, p0 in enumerate(next(iter(ms.values()))["points"]):
        cells = [f"{m['points'][i]['fraction']:.2e} | " + " | ".join(_harm(m["points"][i]["harm"]["prefill"].get(v, {}))
                                                                     for v in views)
                 + f" | {_stop(m['points'][i]['harm']['prefill'])}" for m in ms.values()]
        lines.append(f"| {p0['q']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Smallest pruned fraction that halves harmfulness under the prefill attack:", ""]
    for role, m in ms.items():
        base = {v: m["original"]["harm"]["prefill"].get(v, {}).get("score") for v in views}
        lines.append(f"- {role}: " + "; ".join(
            f"{_view_label(v)}: " + (f"{m['halving'][v]:.2e}" if m["halving"].get(v) is not None else
                                     "nothing to halve" if not base[v] else "not reached") for v in views))
    for name, about in doc["data"].get("harmful_sets", {}).items():
        lines += ["", f"(c) second held-out harmful set {name} ({about.get('selected')} distinct prompts, "
                  "--eval-harm-extra): harmfulness under the prefill attack; q = 0 is the original", "",
                  "| q | " + " | ".join(" | ".join(f"{r} ({_view_label(v)})" for v in views) + f" | {r} stop rate"
                                        for r in ms) + " |",
                  "|---" * (1 + (1 + len(views)) * len(ms)) + "|"]
        firsts = [("0 (original)", [m["original"]["harm_sets"][name]["prefill"] for m in ms.values()])]
        firsts += [(f"{p0['q']:g}", [m["points"][i]["harm_sets"][name]["prefill"] for m in ms.values()])
                   for i, p0 in enumerate(next(iter(ms.values()))["points"])]
        for q, hs in firsts:
            lines.append(f"| {q} | " + " | ".join(" | ".join(_harm(h.get(v, {})) for v in views) + f" | {_stop(h)}"
                                                  for h in hs) + " |")
    if all("xstest" in m["original"] for m in ms.values()):
        lines += ["", f"(d) XSTest safe compliance ({doc['data'].get('xstest')} held-out prompts, keyword:gcg; higher = "
                  "answers more safe questions) against the pruned fraction; q = 0 is the original", "",
                  "| q | " + " | ".join(f"{r} fraction | {r} XSTest" for r in ms) + " |", "|---" * (1 + 2 * len(ms)) + "|"]
        rows = [("0 (original)", [(0.0, m["original"]) for m in ms.values()])]
        rows += [(f"{p0['q']:g}", [(m["points"][i]["fraction"], m["points"][i]) for m in ms.values()])
                 for i, p0 in enumerate(next(iter(ms.values()))["points"])]
        lines += [f"| {q} | " + " | ".join(f"{f:.2e} | {_xs(p)}" for f, p in ps) + " |" for q, ps in rows]
    return "\n".join(lines) + "\n"


def _xs(p: dict) -> str:
    m = p.get("xstest") or {}
    return "n/a" if m.get("compliance") is None else \
        f"{m['compliance']:.2f} [{m['compliance_ci'][0]:.2f}, {m['compliance_ci'][1]:.2f}]"


def plot(doc: dict, path: Path) -> None:
    """Harmfulness under the prefill attack (one panel per judge, 95 % intervals; dashed: the original)
    and the NLL rises, against the pruned fraction, both models."""
    from ..core.plots import pyplot, save

    judges = doc["judges"]
    fig, axes = pyplot().subplots(1, len(judges) + 2, figsize=(4 * (len(judges) + 2), 3.8), squeeze=False)
    for k, (role, m) in enumerate(doc["models"].items()):
        color = f"C{k}"
        pts = [p for p in m["points"] if p["fraction"] > 0]
        xs = [p["fraction"] for p in pts]
        for ax, j in zip(axes[0], judges):
            for v, fmt, tag in ((j, "-o", "full"), (f"{j}/continuation", ":s", "continuation")):
                ys = [p["harm"]["prefill"].get(v, {}) for p in pts]
                ok = [(x, y) for x, y in zip(xs, ys) if y.get("score") is not None]
                if ok:
                    ax.errorbar([x for x, _ in ok], [y["score"] for _, y in ok], fmt=fmt, color=color, capsize=3,
                                label=f"{role}, {tag}", yerr=[[y["score"] - y["score_ci"][0] for _, y in ok],
                                                              [y["score_ci"][1] - y["score"] for _, y in ok]])
            base = m["original"]["harm"]["prefill"][j]["score"]
            if base is not None:
                ax.axhline(base, color=color, ls="--", lw=0.8)
            ax.set_title(f"harmfulness under prefill ({j}; dotted: continuation only)", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
        for ax, key, label in ((axes[0][-2], "d_harmful", "harmful"), (axes[0][-1], "d_benign", "benign")):
            ax.plot(xs, [p[key] for p in pts], "-o", color=color, label=role)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title(f"{label} NLL rise (nats/token, symlog)", fontsize=9)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xlabel("fraction of matched weights pruned")
        ax.legend(fontsize=7)
    save(fig, path, "base vs aligned: harm-specific pruning (dashed: original)", dpi=110)
