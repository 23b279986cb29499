"""``harmprune ablate``: per-category harm sets, their overlap, transfer, compression and location.

One model load serves every measurement; every pruning is applied in place and restored. Scores
are cached under ``scores_dir`` keyed by the model hash, the exact records scored (sha256) and
every setting that changes them, so a re-run (or a run with other q/p) re-uses them.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..attribution.artifact import load_scores, write_scores
from ..attribution.engine import compute_scores
from ..attribution.score import select
from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records, records_sha256
from ..core.errors import HarmpruneError
from ..core.models import DEFAULT_MODEL, load_model, model_hash, model_name
from ..core.settings import check, opt, to_dict
from ..pruning.apply import masked
from ..pruning.select import SCOPES, random_control, select_prune_set
from . import curves, distribution, overlap, plots, report, transfer

METHODS = ["snip", "snip-abs", "wanda"]
RANDOM = "random control"


@dataclass
class AblateConfig:
    """Settings of ``harmprune ablate`` (``make ablation``); defaults fit a 2-core CPU in < 30 min."""

    model: str = opt(DEFAULT_MODEL, help="Hub id, checkpoint directory, .gguf file or alias")
    data: str = opt("harmful", help="harmful completions with a category field (file, hf:, or built-in)")
    category_field: str | None = opt(None, help="field holding the category (default: auto-detect)")
    prompt_field: str | None = opt(None, help="field holding the prompt (default: auto-detect)")
    response_field: str | None = opt(None, help="field holding the response (default: auto-detect)")
    categories: list[str] = opt([], help="categories to study (default: all with enough rows)")
    eval_data: str | None = opt(None, help="held-out harmful data (default: <data>:test for built-ins, "
                                           "else rows held out from --data per category)")
    benign: str = opt("benign", help="benign data whose ability is protected (Top_p)")
    eval_benign: str = opt("benign:test", help="held-out benign completions (benign NLL rise)")
    method: str = opt("snip", help="score of the harmful data", choices=METHODS)
    benign_method: str = opt("snip-abs", help="score of the benign data", choices=METHODS)
    q: float = opt(1e-4, help="Top_q fraction of each category's harm importance")
    p: float = opt(1e-2, help="Top_p fraction of benign importance protected (0 = none: dangerous)")
    scope: str = opt("matrix", help="matrix, row or global", choices=list(SCOPES))
    nsamples: int = opt(16, help="records scored per category (first n after a seeded shuffle)")
    benign_nsamples: int = opt(32, help="benign records scored")
    min_rows: int = opt(8, help="categories with fewer scoring rows are merged into one group (or skipped)")
    eval_per_category: int = opt(4, help="held-out harmful records per category")
    eval_benign_nsamples: int = opt(16, help="held-out benign records")
    curve_qs: list[float] = opt([3e-5, 1e-4, 3e-4], help="q values of the compression curves")
    a_not_b: bool = opt(True, help="measure the A_not_B (A minus B) sets for every pair")
    harm_targets: list[float] = opt([0.05, 0.1, 0.2], help="harm effects for the compression figure "
                                                            "(NLL rise, nats/token)")
    compare_model: str | None = opt(None, help="second model (e.g. the base model) measured the same way")
    generate: bool = opt(False, help="transfer by judged harmfulness of generated replies instead of NLL (slow)")
    judge: str = opt("keyword", help="judge for --generate (keyword, classifier, hf:<model>, ...)")
    max_new_tokens: int = opt(64, help="new tokens per reply with --generate")
    max_length: int = opt(192, help="maximum tokens per sample when scoring and evaluating")
    batch_size: int = opt(4, help="samples per scoring pass (evaluation uses twice as many)")
    format: str = opt("auto", help="auto, chat or raw", choices=["auto", "chat", "raw"])
    seed: int = opt(0, help="seed of the sample selection and the random controls")
    scores_dir: str = opt("scores", help="cache directory for score artifacts")
    out: str | None = opt(None, help="output directory (default: results/ablation-<model>)")
    overwrite: bool = opt(False, help="replace a non-empty --out")
    dtype: str = opt("float32", help="model dtype")
    device: str = opt("cpu", help="device")

    def __post_init__(self):
        check(0 < self.q <= 1 and 0 <= self.p <= 1, "--q must be in (0, 1] and --p in [0, 1]")
        validate.check_device(self.device)
        check(all(0 < q <= 1 for q in self.curve_qs), "--curve-qs must be fractions in (0, 1]")
        check(self.nsamples >= 1 and self.benign_nsamples >= 1, "--nsamples and --benign-nsamples must be >= 1")
        check(self.eval_per_category >= 1 and self.eval_benign_nsamples >= 1, "evaluation sizes must be >= 1")
        check(self.min_rows >= 1, "--min-rows must be >= 1")
        check(self.max_length >= 2 and self.batch_size >= 1, "--max-length >= 2 and --batch-size >= 1")

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


def _shuffled(rows: list, seed: int) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


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
        held = {c: _shuffled(v, cfg.seed)[: cfg.eval_per_category] for c, v in by_cat.items()}
        train = {c: _shuffled(v, cfg.seed)[cfg.eval_per_category:] for c, v in by_cat.items()}
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


def cached_record_scores(model, tok, mhash: str, spec: str, records: list, method: str, label: str,
                         cfg: AblateConfig):
    """Scores of exactly ``records``: read from the cache, or computed once and written there."""
    key = manifest.sha256_json({"model_hash": mhash, "records": records_sha256(records), "method": method,
                                "max_length": cfg.max_length, "format": cfg.format, "dtype": cfg.dtype})[:12]
    d = Path(cfg.scores_dir) / model_name(spec) / f"ablate-{_slug(label)}-{method}-n{len(records)}-{key}"
    if not (d / "meta.json").is_file():
        scores, stats = compute_scores(model, tok, records, method, fmt=cfg.format, max_length=cfg.max_length,
                                       batch_size=cfg.batch_size, progress=True)
        params = dict(model.named_parameters(remove_duplicate=False))
        meta = {"method": method, "model_hash": mhash, "label": label,
                "shapes": {k: list(params[k].shape) for k in scores},
                "records_sha256": records_sha256(records), "record_ids": [r.id for r in records],
                "nsamples": {"used": stats["samples"], "skipped": stats["skipped"]},
                "tokens": stats["tokens"], "format": stats["format"], "max_length": cfg.max_length,
                "dtype": cfg.dtype, "mean_nll": stats["mean_nll"], "engine_seconds": stats["engine_seconds"],
                "versions": manifest.versions()}
        with manifest.atomic_dir(d, overwrite=True) as tmp:
            write_scores(tmp, scores, meta)
    else:
        print(f"harmprune: re-using scores {d}")
    return load_scores(d, lazy=True)  # read one matrix at a time: 11 score sets need not fit in memory


# ---------------------------------------------------------------- one model


def _sets_at(q: float, harm: dict, benign, cfg: AblateConfig) -> tuple[dict, dict]:
    sets, stats = {}, {}
    for g, s in harm.items():
        sets[g], st = select_prune_set(s.tensors, benign.tensors if cfg.p > 0 else None, s.method,
                                       benign.method, q, cfg.p, cfg.scope)
        stats[g] = {k: st[k] for k in ("total_pruned", "total_numel", "total_fraction", "per_module_type")}
        stats[g]["warnings"] = st["warnings"]
    return sets, stats


def study(model, tok, spec: str, tag: str, cfg: AblateConfig, train: dict[str, list], held: dict[str, list],
          benign_rows: list, eval_benign: list, timing: dict) -> dict:
    """Every measurement for one loaded model; returns its JSON-ready results."""
    import warnings

    from ..pruning.select import PruneWarning

    warnings.simplefilter("ignore", PruneWarning)  # the warnings are kept in the results instead
    mhash = model_hash(model)
    nll = transfer.NLLMeasure(cfg.format, cfg.max_length, 2 * cfg.batch_size)
    measure = nll
    if cfg.generate:
        from ..evals.generation import GenConfig
        from ..evals.judges import get_judge

        measure = transfer.JudgedMeasure(get_judge(cfg.judge), GenConfig(max_new_tokens=cfg.max_new_tokens,
                                                                          format=cfg.format, seed=cfg.seed))
    t = time.perf_counter()
    harm = {g: cached_record_scores(model, tok, mhash, spec, rows, cfg.method, f"{g}", cfg) for g, rows in train.items()}
    benign = cached_record_scores(model, tok, mhash, spec, benign_rows, cfg.benign_method, "benign", cfg)
    timing[f"{tag}: scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    sets, set_stats = _sets_at(cfg.q, harm, benign, cfg)
    union = overlap.union(list(sets.values()))
    numel = sum(m.numel() for m in union.values())
    largest = max(sets, key=lambda g: overlap.count(sets[g]))
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
        qu = overlap.union(list(qsets.values()))
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
        "model": spec, "model_hash": mhash, "numel": numel,
        "measure": {"name": measure.name, "sign": measure.sign},
        "base": {"harmful_by_category": base, "harmful_pooled_nll": base_pooled, "benign_nll": base_benign},
        "sets": set_stats, "union_size": overlap.count(union),
        "score_dirs": {**{g: str(s.path) for g, s in harm.items()}, "benign": str(benign.path)},
        "overlap": overlap.overlap_matrix(sets),
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
    score_rows = {g: select([r for c in cats for r in train[c]], cfg.nsamples, cfg.seed) for g, cats in groups.items()}
    eval_rows = {}
    for g, cats in groups.items():
        rows = _shuffled([r for c in cats for r in held.get(c, [])], cfg.seed)[: cfg.eval_per_category]
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
    benign_rows = select(brows, cfg.benign_nsamples, cfg.seed)
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
        model, tok = load_model(spec, cfg.dtype, cfg.device)
        timing[f"{name}: load"] = time.perf_counter() - t
        results["models"][name] = study(model, tok, spec, name, cfg, score_rows, eval_rows, benign_rows,
                                        eval_benign, timing)
        del model
    timing["total"] = time.perf_counter() - t0
    results["timing_seconds"] = timing
    results["summary"] = report.summarize(results)
    with manifest.atomic_dir(out, cfg.overwrite) as tmp:
        figures = plots.all_figures(results, tmp)
        results["figures"] = figures
        manifest.write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(report.render(results))
    print(f"harmprune: ablation written to {out} ({timing['total'] / 60:.1f} min)")
    return out
