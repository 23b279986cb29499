"""``harmprune ablate``: per-category harm sets, their overlap, transfer, compression and location.

One model handle serves every measurement; every pruning is applied in place and restored. Scores
go through the one score cache (``attribution.cache``): a re-run, a run with other q/p, and the
benign scores ``make prune`` already computed are re-used.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ...attribution.score import select
from ...core import manifest
from ...core.data import DataSpec, data_fingerprint, load_records
from ...core.errors import HarmpruneError
from ...core.models import load_model, model_name
from ...core.options import (BenignOptions, CacheOptions, DataOptions, FieldOptions, HarmJudgeOptions, MethodOptions,
                             ModelOptions, NewTokensOptions, OutputOptions, ScopeOptions, ScoringOptions,
                             SelectionOptions, check_scoring, check_selection, needs_benign, pick)
from ...core.settings import check, check_min, opt, to_dict
from ...pruning import masks
from ...pruning.apply import masked
from ...pruning.harmset import harm_set, scores_of
from ...pruning.select import random_control
from . import curves, distribution, plots, report, transfer

RANDOM = "random control"


@dataclass(kw_only=True)
class AblateConfig(ModelOptions, DataOptions, FieldOptions, BenignOptions, MethodOptions, SelectionOptions,
                   ScopeOptions, ScoringOptions, CacheOptions, HarmJudgeOptions, NewTokensOptions, OutputOptions):
    """Settings of ``harmprune ablate`` (``make ablation``); ``--out`` defaults to results/ablation-<model>.

    ``--data`` holds harmful completions with a category field; ``--nsamples`` benign records are scored
    (as the pipeline does, so ``make prune``'s cached benign scores are re-used) and
    ``--category-nsamples`` records per category. ``--judge`` and ``--max-new-tokens`` apply with ``--generate``.
    """

    categories: list[str] = opt([], help="categories to study (default: all with enough rows)")
    eval_data: str | None = opt(None, help="held-out harmful data (default: <data>:test for built-ins, "
                                           "else rows held out from --data per category)", role="input")
    category_nsamples: int = opt(16, help="records scored per category (first n after a seeded shuffle)", range=">= 1")
    min_rows: int = opt(8, help="categories with fewer scoring rows are merged into one group (or skipped)", range=">= 1")
    eval_per_category: int = opt(4, help="held-out harmful records per category", range=">= 1")
    eval_benign_nsamples: int = opt(16, help="held-out benign records", range=">= 1")
    curve_qs: list[float] = opt([3e-5, 1e-4, 3e-4], help="q values of the compression curves", range="(0, 1]")
    a_not_b: bool = opt(True, help="measure the A_not_B (A minus B) sets for every pair")
    harm_targets: list[float] = opt([0.05, 0.1, 0.2], help="harm effects for the compression figure "
                                                            "(NLL rise, nats/token)", range="> 0")
    compare_model: str | None = opt(None, help="second model (e.g. the base model) measured the same way", role="input")
    generate: bool = opt(False, help="transfer by judged harmfulness of generated replies instead of NLL (slow)")

    def __post_init__(self):
        check(0 < self.q <= 1 and 0 <= self.p <= 1, "--q must be in (0, 1] and --p in [0, 1]")
        check_selection(self)
        check_scoring(self)
        check(all(0 < q <= 1 for q in self.curve_qs), "--curve-qs must be fractions in (0, 1]")
        check_min(self, 1, "nsamples", "category_nsamples", "eval_per_category", "eval_benign_nsamples", "min_rows")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / f"ablation-{model_name(self.model)}"

    def spec(self, data: str, category: str | None = None) -> DataSpec:
        return DataSpec(data=data, prompt_field=self.prompt_field, response_field=self.response_field,
                        category_field=self.category_field, category=category)


# ---------------------------------------------------------------- data: groups and held-out rows


def group_categories(counts: dict[str, int], wanted: list[str], min_rows: int) -> tuple[dict[str, list[str]], list[str]]:
    """``({group name: [categories]}, notes)``: categories with < ``min_rows`` rows are merged into
    one group ``other (...)`` when together they reach ``min_rows``, else skipped; both noted."""
    missing = [c for c in wanted if c not in counts]
    if missing:
        raise HarmpruneError(f"--categories {missing[0]!r} has no rows; categories: "
                             + ", ".join(f"{c} ({n})" for c, n in sorted(counts.items())))
    cats = wanted or sorted(counts)
    groups = {c: [c] for c in cats if counts[c] >= min_rows}
    small = [c for c in cats if counts[c] < min_rows]
    notes = []
    if small:
        total = sum(counts[c] for c in small)
        if len(small) > 1 and total >= min_rows:
            name = f"other ({', '.join(small)})"
            groups[name] = small
            notes.append(f"merged {len(small)} categories with fewer than {min_rows} rows into '{name}'")
        else:
            notes.append(f"skipped {', '.join(small)}: fewer than {min_rows} rows")
    if len(groups) < 2:
        raise HarmpruneError(f"need at least 2 categories with >= {min_rows} rows; have "
                             + ", ".join(f"{c} ({n})" for c, n in sorted(counts.items())))
    return groups, notes


def _eval_source(cfg: AblateConfig) -> str | None:
    """The held-out data name, or None to hold rows out of ``--data``."""
    from harmprune import data as builtin

    if cfg.eval_data:
        return cfg.eval_data
    parsed = builtin.parse(cfg.data)
    if parsed is not None and parsed[1] == "train":
        return cfg.data.partition(":")[0] + ":test"
    return None


def split_rows(cfg: AblateConfig) -> tuple[dict[str, list], dict[str, list], dict]:
    """``(scoring rows by category, held-out rows by category, data fingerprints)``."""
    spec = cfg.spec(cfg.data)
    rows = load_records(spec)
    fps = {"harmful": data_fingerprint(spec, rows)}
    by_cat: dict[str, list] = {}
    for r in rows:
        if r.category is not None:
            by_cat.setdefault(r.category, []).append(r)
    if not by_cat:
        raise HarmpruneError(f"{cfg.data}: no row has a category; pass --category-field")
    src = _eval_source(cfg)
    if src is None:  # hold out the first eval_per_category of each category's seeded shuffle
        held = {c: select(v, 0, cfg.seed)[: cfg.eval_per_category] for c, v in by_cat.items()}
        train = {c: select(v, 0, cfg.seed)[cfg.eval_per_category:] for c, v in by_cat.items()}
        fps["held_out"] = {"source": f"{cfg.eval_per_category} rows per category held out of {cfg.data}"}
    else:
        espec = cfg.spec(src)
        erows = load_records(espec)
        fps["held_out"] = data_fingerprint(espec, erows)
        held = {}
        for r in erows:
            held.setdefault(r.category, []).append(r)
        train = by_cat
    return train, held, fps


# ---------------------------------------------------------------- scores (cached)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "set"


def category_scores(handle, cfg: AblateConfig, group: str, rows: list):
    """Scores of a category group's ``--category-nsamples`` records, through the one score cache."""
    opts = pick(ScoringOptions, cfg, nsamples=cfg.category_nsamples)
    return scores_of(handle, cfg.spec(cfg.data), cfg.method, opts, cfg.scores_dir, rows=rows,
                     label=f"{cfg.data}-{_slug(group)}")


# ---------------------------------------------------------------- one model


def _sets_at(q: float, harm: dict, benign, cfg: AblateConfig) -> tuple[dict, dict]:
    sets, stats = {}, {}
    for g, s in harm.items():
        sets[g], st = harm_set(s, benign if needs_benign(cfg) else None, q, cfg.p, cfg.scope, cfg.selection)
        stats[g] = {k: st[k] for k in ("total_pruned", "total_numel", "total_fraction", "per_module_type")}
        stats[g]["warnings"] = st["warnings"]
    return sets, stats


def study(handle, tag: str, cfg: AblateConfig, train: dict[str, list], held: dict[str, list],
          benign_rows: list, eval_benign: list, timing: dict) -> dict:
    """Every measurement for one loaded model; returns its JSON-ready results.

    ``train``: each group's scoring rows before selection (the cache selects ``--category-nsamples``);
    ``benign_rows``: every row of ``--benign`` (the cache selects ``--nsamples``, as the pipeline does)."""
    import warnings

    from ...pruning.select import PruneWarning

    warnings.simplefilter("ignore", PruneWarning)  # the warnings are kept in the results instead
    model, tok = handle
    nll = transfer.NLLMeasure(cfg.format, cfg.max_length, 2 * cfg.batch_size)
    measure = nll
    if cfg.generate:
        from ...evals.generation import GenConfig
        from ...evals.judges import get_judge

        measure = transfer.JudgedMeasure(get_judge(cfg.judge), GenConfig(max_new_tokens=cfg.max_new_tokens,
                                                                          format=cfg.format, seed=cfg.seed))
    t = time.perf_counter()
    harm = {g: category_scores(handle, cfg, g, rows) for g, rows in train.items()}
    benign = scores_of(handle, cfg.benign, cfg.benign_method, cfg, cfg.scores_dir, rows=benign_rows)
    timing[f"{tag}: scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    sets, set_stats = _sets_at(cfg.q, harm, benign, cfg)
    union = masks.union(list(sets.values()))
    numel = sum(m.numel() for m in union.values())
    largest = max(sets, key=lambda g: masks.count(sets[g]))
    ctrl = random_control(sets[largest], cfg.seed)
    base = transfer.measure_all(model, tok, held, measure)
    base_benign = nll(model, tok, eval_benign)
    pooled = [r for g in held for r in held[g]]
    base_pooled = nll(model, tok, pooled)
    timing[f"{tag}: baseline"] = time.perf_counter() - t

    t = time.perf_counter()
    tr = transfer.transfer_matrix(model, tok, {**sets, RANDOM: ctrl}, held, measure, base)
    tr["benign_effect"] = []
    for name, m in tqdm({**sets, RANDOM: ctrl}.items(), desc="benign NLL per prune set"):
        with masked(model, m):
            tr["benign_effect"].append(nll(model, tok, eval_benign) - base_benign)
    tr["random_control_size_of"] = largest
    timing[f"{tag}: transfer"] = time.perf_counter() - t

    anb = None
    if cfg.a_not_b:
        t = time.perf_counter()
        anb = transfer.a_not_b_matrix(model, tok, sets, held, measure, base)
        timing[f"{tag}: A_not_B"] = time.perf_counter() - t

    t = time.perf_counter()
    curve = {"union": [], RANDOM: [], **{g: [] for g in sets}}
    for q in tqdm(sorted(cfg.curve_qs), desc="compression curves (q)"):
        qsets, _ = _sets_at(q, harm, benign, cfg)
        qu = masks.union(list(qsets.values()))
        # benign NLL for the union and the random control only: per category it would triple the cost
        for name, m, rows, b, brows in (("union", qu, pooled, base_pooled, eval_benign),
                                        (RANDOM, random_control(qu, cfg.seed), pooled, base_pooled, eval_benign),
                                        *((g, qsets[g], held[g], base[g] if measure is nll else None, [])
                                          for g in qsets if g in held)):
            if b is None:
                b = nll(model, tok, rows)
            curve[name].append({"q": q, **curves.point(model, tok, m, numel, rows, brows, nll, nll,
                                                       b, base_benign)})
    timing[f"{tag}: curves"] = time.perf_counter() - t

    return {
        "model": handle.spec, "model_hash": handle.hash, "numel": numel,
        "measure": {"name": measure.name, "sign": measure.sign},
        "base": {"harmful_by_category": base, "harmful_pooled_nll": base_pooled, "benign_nll": base_benign},
        "sets": set_stats, "union_size": masks.count(union),
        "score_dirs": {**{g: str(s.path) for g, s in harm.items()}, "benign": str(benign.path)},
        "overlap": masks.overlap_matrix(sets),
        "transfer": tr, "a_not_b": anb, "curves": curve,
        "distribution": {"union": distribution.distribution(union),
                         **{g: distribution.distribution(m) for g, m in sets.items()}},
        "compression": {str(x): curves.fraction_to_reach(curve["union"], x) for x in cfg.harm_targets},
    }


# ---------------------------------------------------------------- the stage


def ablate(cfg: AblateConfig) -> Path:
    """Run every study, write results.json, report.md and the figures; return the output directory."""
    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    manifest.banner("ablate", {**to_dict(cfg), "out": str(out)})
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    train, held, fps = split_rows(cfg)
    groups, notes = group_categories({c: len(v) for c, v in train.items()}, cfg.categories, cfg.min_rows)
    group_rows = {g: [r for c in cats for r in train[c]] for g, cats in groups.items()}
    score_rows = {g: select(rows, cfg.category_nsamples, cfg.seed) for g, rows in group_rows.items()}
    eval_rows = {}
    for g, cats in groups.items():
        rows = select([r for c in cats for r in held.get(c, [])], cfg.eval_per_category, cfg.seed)
        if rows:
            eval_rows[g] = rows
        else:
            notes.append(f"{g}: no held-out rows, so it appears as a prune set but not as a measured category")
    if len(eval_rows) < 2:
        raise HarmpruneError("need held-out rows for at least 2 categories; check --eval-data")
    brows = load_records(DataSpec(data=cfg.benign))
    fps["benign"] = data_fingerprint(DataSpec(data=cfg.benign), brows)
    ebrows = load_records(DataSpec(data=cfg.eval_benign))
    fps["eval_benign"] = data_fingerprint(DataSpec(data=cfg.eval_benign), ebrows)
    benign_rows = select(brows, cfg.nsamples, cfg.seed)
    eval_benign = select(ebrows, cfg.eval_benign_nsamples, cfg.seed)

    results = {
        "config": to_dict(cfg), "versions": manifest.versions(), "data": fps,
        "categories": {"groups": groups, "notes": notes,
                       "scoring_rows": {g: len(v) for g, v in score_rows.items()},
                       "held_out_rows": {g: len(v) for g, v in eval_rows.items()},
                       "benign_rows": len(benign_rows), "eval_benign_rows": len(eval_benign)},
        "models": {},
    }
    for spec in [cfg.model] + ([cfg.compare_model] if cfg.compare_model else []):
        name = model_name(spec)
        name = name if name not in results["models"] else f"{name} (compare)"
        t = time.perf_counter()
        handle = load_model(spec, cfg.dtype, cfg.device)
        timing[f"{name}: load"] = time.perf_counter() - t
        results["models"][name] = study(handle, name, cfg, group_rows, eval_rows, brows, eval_benign, timing)
        del handle
    timing["total"] = time.perf_counter() - t0
    results["timing_seconds"] = timing
    results["summary"] = report.summarize(results)
    with manifest.atomic_dir(out, cfg.overwrite) as tmp:
        figures = plots.all_figures(results, tmp)
        results["figures"] = figures
        manifest.write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(report.render(results))
        manifest.write_config(tmp, "ablate", cfg, out=str(out))
    print(f"harmprune: ablation written to {out} ({timing['total'] / 60:.1f} min)")
    return out
