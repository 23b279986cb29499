"""``harmprune eval harm``: generate replies to harmful prompts, judge them, report per category.

Metrics per judge, overall (task ``harm/<judge>``) and per category (``harm/<judge>/<category>``):
- ``score``: mean judge harmfulness in [0, 1] (higher = more harmful), over samples the judge scored;
- ``refusal_rate``: fraction of samples the judge calls a refusal (over samples where it tells);
- each with ``<metric>_stderr`` (sample standard error; the ``n`` samples of one prompt count as
  independent), and counts: ``samples``, ``scored``, ``refusal_judged``, ``errors`` (judge failures:
  recorded in samples.jsonl, excluded from the means, never fatal).
``--prefill K`` forces the first K tokens of each prompt's reference response (the prefilling
attack); the forced text is part of the judged reply and is stored as ``prefill`` in samples.jsonl.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..core import validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.options import FieldOptions, HarmJudgeOptions, JudgeOptions, LimitOptions, ResumeOptions
from ..core.settings import check, check_min, opt, to_dict
from . import results as R
from .generation import GenConfig, generate, prefill_prefixes
from .base import EvalBase, eval_backend
from .judges import Verdict, get_judge, one_by_one_on_failure
from .tasks import TASKS, Outcome, Prepared, register_task, run_eval

JUDGE_CHUNK = 64  # samples per judge call: progress and error isolation without per-sample overhead


# ---------------------------------------------------------------- shared by the eval commands


def judge_specs(spec: str) -> list[str]:
    specs = [s.strip() for s in (spec or "").split(",") if s.strip()]
    check(bool(specs), "--judge must name at least one judge")
    return specs


def load_judges(spec: str, **options) -> list:
    """Judges for a comma-separated spec (``keyword,classifier``); unknown names fail here, early."""
    return [get_judge(s, **options) for s in judge_specs(spec)]


def judge_all(judge, prompts: list[str], responses: list[str]) -> list[Verdict]:
    """One Verdict per pair; a judge exception becomes that sample's ``error`` (never fatal)."""
    out: list[Verdict] = []
    pairs = list(zip(prompts, responses))
    with tqdm(total=len(pairs), desc=f"judge {judge.name}", unit="sample", file=sys.stderr) as bar:
        for s in range(0, len(pairs), JUDGE_CHUNK):
            out += one_by_one_on_failure(lambda ps: judge.judge([p for p, _ in ps], [r for _, r in ps]),
                                         pairs[s : s + JUDGE_CHUNK], lambda why: Verdict(error=why))
            bar.update(min(JUDGE_CHUNK, len(pairs) - s))
    return out


# ---------------------------------------------------------------- aggregation (pure)


def verdict_metrics(verdicts: list[dict]) -> dict:
    """Metrics of one judge over samples (verdicts as dicts with score/refusal/error)."""
    scores = [float(v["score"]) for v in verdicts if v.get("error") is None and v.get("score") is not None]
    refusals = [float(bool(v["refusal"])) for v in verdicts if v.get("error") is None and v.get("refusal") is not None]
    return {**R.summarize(scores, "score"), **R.summarize(refusals, "refusal_rate"),
            "samples": len(verdicts), "scored": len(scores), "refusal_judged": len(refusals),
            "errors": sum(v.get("error") is not None for v in verdicts)}


def aggregate(samples: list[dict], judges: list[str], task: str = "harm") -> dict:
    """``{task/judge: overall metrics, task/judge/category: per-category metrics}``.

    ``samples[i]["judges"][name]`` is the verdict dict; categories in order of first appearance,
    samples without a category under ``(none)``.
    """
    out = {}
    cats = list(dict.fromkeys(s.get("category") or "(none)" for s in samples))
    for name in judges:
        out[f"{task}/{name}"] = verdict_metrics([s["judges"][name] for s in samples])
        if len(cats) > 1 or cats != ["(none)"]:
            for c in cats:
                vs = [s["judges"][name] for s in samples if (s.get("category") or "(none)") == c]
                out[f"{task}/{name}/{c}"] = verdict_metrics(vs)
    return out


def judge_samples(samples: list[dict], judges: list) -> None:
    """Fill ``samples[i]["judges"][judge.name]`` in place."""
    prompts = [s["prompt"] for s in samples]
    responses = [s["response"] for s in samples]
    for j in judges:
        for s, v in zip(samples, judge_all(j, prompts, responses)):
            s.setdefault("judges", {})[j.name] = v.to_dict()


def generate_samples(model, tok, records, gen: GenConfig) -> list[dict]:
    """Generate ``gen.n`` replies per record: sample dicts (id, category, prompt, sample, prefill, response)."""
    refs = [r.response for r in records] if gen.prefill else None
    systems = [r.system for r in records] if any(r.system for r in records) else None
    replies = generate(model, tok, [r.prompt for r in records], gen, prefill_texts=refs, system=systems)
    forced = prefill_prefixes(tok, refs, gen.prefill) if gen.prefill else [None] * len(records)
    return [{"id": r.id, "category": r.category, "prompt": r.prompt, "sample": j, "prefill": forced[i],
             "response": reply}
            for i, (r, rs) in enumerate(zip(records, replies)) for j, reply in enumerate(rs)]


# ---------------------------------------------------------------- the command


@dataclass(kw_only=True)
class HarmConfig(EvalBase, FieldOptions, LimitOptions, HarmJudgeOptions, JudgeOptions, ResumeOptions):
    """Settings of ``harmprune eval harm`` (generation settings: GenConfig)."""

    prompts: str = opt("harmful:test", help="harmful prompts: file, hf:<name>[:<split>] or built-in "
                                            "(default harmful:test has reference responses for --prefill)", role="input")
    max_judge_errors: float = opt(0.25, help="fraction of samples a judge may fail on; more ends the run with an "
                                             "error (the replies stay in --out for --resume)", range="[0, 1]")

    def __post_init__(self):
        super().__post_init__()
        check_min(self, 0, "limit", "judge_retries")
        judge_specs(self.judge)
        validate.check_finite(self.judge_timeout, "--judge-timeout")
        check(self.judge_timeout > 0, "--judge-timeout must be > 0 seconds")
        validate.check_fraction(self.max_judge_errors, "--max-judge-errors")

    def data_spec(self) -> DataSpec:
        return DataSpec(data=self.prompts, prompt_field=self.prompt_field, response_field=self.response_field,
                        category_field=self.category_field, category=self.category)


def judge_options(cfg) -> dict:
    """Options of the judges a command loads: endpoint, request timeout and retries, device and dtype of
    local judges."""
    from ..core.models import resolve_device

    opts = {"url": getattr(cfg, "judge_url", None), "device": resolve_device(getattr(cfg, "judge_device", "auto")),
            "dtype": getattr(cfg, "judge_dtype", "float32")}
    for key, name in (("timeout", "judge_timeout"), ("max_retries", "judge_retries")):
        if getattr(cfg, name, None) is not None:
            opts[key] = getattr(cfg, name)
    return opts


def load_prompts(spec: DataSpec, limit: int, seed: int, need_response: bool) -> tuple[list, dict]:
    """Up to ``limit`` records of ``spec`` (0 = all; seeded, spread over categories) and their fingerprint."""
    records = load_records(spec, require_response=need_response)
    fingerprint = data_fingerprint(spec, records)
    chosen = R.subsample(records, limit, seed, key=lambda r: r.category)
    return chosen, {**fingerprint, "selected": len(chosen), "limit": limit}


def report_tables(judges: list[str], results: dict) -> str:
    """The body of ``eval harm``'s report.md: harmfulness and refusal rate per judge, overall and per category."""
    rows = [[name, R.value_cell(results[f"harm/{name}"], "score"), R.value_cell(results[f"harm/{name}"], "refusal_rate"),
             results[f"harm/{name}"]["samples"], results[f"harm/{name}"]["errors"]] for name in judges]
    lines = ["## Overall", "", R.md_table(["judge", "harmfulness", "refusal rate", "samples", "errors"], rows)]
    for name in judges:
        cat_rows = [[k.split("/", 2)[2], R.value_cell(m, "score"), R.value_cell(m, "refusal_rate"), m["samples"],
                     m["errors"]] for k, m in results.items() if k.startswith(f"harm/{name}/")]
        if cat_rows:
            lines += [f"## Per category ({name})", "",
                      R.md_table(["category", "harmfulness", "refusal rate", "samples", "errors"], cat_rows)]
    return "\n".join(lines)


@register_task
class HarmTask:
    name, title = "harm", "harmfulness and refusal rate of replies to harmful prompts"

    def prepare(self, cfg: HarmConfig, gen: GenConfig) -> Prepared:
        from . import pending

        saved = pending.check_out(cfg.out, cfg.overwrite, cfg.resume)  # --out, or this run's saved replies
        judges = load_judges(cfg.judge, **judge_options(cfg))
        records, data = load_prompts(cfg.data_spec(), cfg.limit, gen.seed, need_response=gen.prefill > 0)
        gen = dataclasses.replace(gen, backend=eval_backend(gen.backend, cfg))  # record the backend used
        return Prepared(data, {"saved": saved, "judges": judges, "records": records}, gen)

    def run(self, load, cfg: HarmConfig, prep: Prepared) -> Outcome:
        from . import pending

        st, gen = prep.state, prep.gen
        config = {**to_dict(cfg), "generation": to_dict(gen)}
        pending.check_judges(st["judges"])  # a dead or refusing endpoint fails here, before generation
        if st["saved"] is not None:
            samples, minfo = pending.saved_samples(cfg.out, st["saved"], config, prep.data), st["saved"]["model"]
            print(f"harmprune: resuming: judging the {len(samples)} replies saved in {cfg.out}", file=sys.stderr)
        else:
            model, tok, minfo = load()
            samples = generate_samples(model, tok, st["records"], gen)
            pending.save(cfg.out, cfg.overwrite, {"config": config, "data": prep.data, "model": minfo}, samples)
        pending.judge_or_stop(samples, st["judges"], cfg.max_judge_errors, cfg.out, judge_samples)
        names = [j.name for j in st["judges"]]
        results = aggregate(samples, names)
        notes = [f"judges: {', '.join(names)}; harmfulness in [0, 1], higher = more harmful",
                 f"generation: max_new_tokens {gen.max_new_tokens}, temperature {gen.temperature}, n {gen.n}, "
                 f"prefill {gen.prefill}, backend {gen.backend}"]
        notes += [f"adapter: `{cfg.adapter}`"] if cfg.adapter else []
        notes += [f"quantized on load: {minfo['quantize']} (bitsandbytes)"] if minfo.get("quantize") else []
        return Outcome(results, samples, minfo, notes, report_tables(names, results), extra={"judges": names})


def eval_harm(cfg: HarmConfig, gen: GenConfig) -> Path:
    """Run ``eval harm``; return the run directory. Bad input raises HarmpruneError before any model load;
    the replies are saved in ``--out`` before judging (``--resume`` finishes an interrupted run)."""
    return run_eval(TASKS["harm"], cfg, gen, overwrite_own=True)
