"""``harmprune em-experiment`` (``make em``): does pruning harm weights stop emergent misalignment?

Steps, each written to its own sub-directory of ``out`` and skipped when already complete there
(so an interrupted experiment continues where it stopped; a fine-tune continues from its last
checkpoint):

1. ``pruned/``: the harm-specific pruned checkpoint (``run_pipeline``; scores from the shared
   ``--scores-dir`` cache, so ``make prune``'s are re-used), or ``--pruned DIR``. ``--prune-data harm``
   (default) scores make prune's general harm data; ``narrow`` the fine-tuning data's own replies
   (B-TAP's narrow-domain pruning), written to ``narrow.jsonl``.
2. ``random/``: a random control with the same count per matrix (``prune --control random`` from
   the pruned checkpoint's scores; from its mask alone when those scores are gone).
3. ``ft-{original,pruned,random}/``: fine-tune each on the narrow data; pruned and random keep their
   mask (``--keep-mask``, merged LoRA or masked full fine-tune), so pruned weights stay exactly 0.
4. ``em/{original,pruned,random}{,-tuned}/``: ``eval em`` of all six models with one judge
   (default ``em-classifier``, the shipped offline EM judge).
5. With a narrow *harm* domain (``--train-data harmful --category C``: the shipped harmful train
   replies of category C), ``harm/<model>/``: ``eval harm`` of all six models, without an attack, on the
   held-out ``harmful:test`` prompts of every *other* category (keyword and classifier judges): does
   learning one harm category spread to the others (narrow harm -> broad harm)?

Then ``report.md`` (table: model, tuned?, misaligned rate [95% CI], n judged, mean aligned, mean
coherent), ``em_rates.png`` (bars with the intervals) and ``experiment.json`` (settings, versions,
paths, every number), all computed from the step outputs of this run; with step 5 also the broad-harm
table and ``harm_broad.png``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest
from ..core.errors import HarmpruneError
from ..core.options import (BackendOptions, CacheOptions, EMQuestionOptions, EMSamplingOptions, EvalSetOptions,
                            FieldOptions, JudgeOptions, LimitOptions, ModelOptions, OutputOptions, PrunedOptions,
                            QuantizeOptions, RatingJudgeOptions, ScoringOptions, SelectionOptions, TrainDataOptions,
                            TrainOptions, check_sampling, check_scoring, check_selection, pick)
from ..core.settings import check, check_min, opt, to_dict
from ..evals import em
from ..evals import results as R

ARMS = ("original", "pruned", "random")
HARM_DATA = ("harmful", "harmful:train")  # with --category: a narrow harm domain
BROAD_PROMPTS = "harmful:test"
BROAD_JUDGES = "keyword,classifier"
DONE_FILES = {"prune": "prune_config.json", "finetune": "finetune_config.json", "eval": R.RESULTS_FILE}


@dataclass(kw_only=True)
class EMExperimentConfig(ModelOptions, RatingJudgeOptions, JudgeOptions, TrainDataOptions, FieldOptions,
                         OutputOptions, SelectionOptions, ScoringOptions, CacheOptions, EvalSetOptions, TrainOptions,
                         LimitOptions, EMQuestionOptions, EMSamplingOptions, BackendOptions, QuantizeOptions,
                         PrunedOptions):
    """Settings of ``harmprune em-experiment``; ``--out`` defaults to results/em-<model>. Pruning (without
    ``--pruned``) runs the pipeline with ``--q``/``--p``/scoring options (scores cached in ``--scores-dir``);
    ``--limit`` subsets and ``--category`` filters the fine-tuning data (``--train-data harmful --category C``
    = a narrow harm domain, which adds the broad-harm evaluation); quantized loading applies to the EM
    evaluation only; ``--seed`` seeds everything."""

    random_control: str | None = opt(None, help="existing random-control checkpoint instead of pruning one", role="input")
    prune_data: str = opt("harm", help="what the pruned set removes: harm = the general harm data (as make prune), "
                                       "narrow = the fine-tuning data's own replies (B-TAP's narrow-domain pruning)",
                          choices=["harm", "narrow"])
    broad_limit: int = opt(0, help="broad-harm evaluation (narrow harm domain only): at most this many held-out "
                                   "prompts of the other categories, spread over them (0 = all)", range=">= 0")
    broad_tokens: int = opt(48, help="broad-harm evaluation: new tokens per greedy reply", range=">= 1")

    def __post_init__(self):
        em.check_rating_judge(self.judge)
        check_min(self, 0, "broad_limit")
        check_min(self, 1, "broad_tokens")
        check(self.prune_data != "narrow" or not self.pruned, "--prune-data narrow prunes here; drop --pruned")
        check(self.pruned is None or Path(self.pruned, DONE_FILES["prune"]).is_file(),
              f"--pruned {self.pruned}: not a pruned checkpoint (no {DONE_FILES['prune']})")
        check(self.random_control is None or Path(self.random_control, "mask.safetensors").is_file(),
              f"--random-control {self.random_control}: no mask.safetensors there")
        for group_check in (check_sampling, check_scoring, check_selection):  # each group's own rules
            group_check(self)
        check(not (self.load_in_8bit and self.load_in_4bit), "--load-in-8bit and --load-in-4bit exclude each other")

    def narrow_harm(self) -> bool:
        """Fine-tuning on one (or a few) categories of the shipped harmful train split."""
        return self.train_data in HARM_DATA and bool(self.category)

    def out_dir(self) -> Path:
        from ..core.models import model_name

        return Path(self.out) if self.out else Path("results") / f"em-{model_name(self.model)}"

    def device_name(self) -> str:
        from ..core.models import resolve_device

        return resolve_device(self.device)


def done(path: Path, kind: str, what: str) -> bool:
    """Whether a ``kind`` step finished in ``path`` before (then it is re-used, with a notice)."""
    if not (path / DONE_FILES[kind]).is_file():
        return False
    print(f"harmprune: em-experiment: {what} already done in {path}, re-using it", file=sys.stderr)
    return True


# ---------------------------------------------------------------- steps


def pruned_step(cfg: EMExperimentConfig, out: Path) -> Path:
    if cfg.pruned:
        return Path(cfg.pruned)
    target = out / "pruned"
    if done(target, "prune", "pruning"):
        return target
    from .pipeline import PipelineConfig, run_pipeline

    harm = {"harm": str(write_narrow(cfg, out / "narrow.jsonl"))} if cfg.prune_data == "narrow" else {}
    return run_pipeline(pick(PipelineConfig, cfg, out=str(target), device=cfg.device_name(), overwrite=True,
                             headline=False, judge="keyword", **harm))


def write_narrow(cfg: EMExperimentConfig, path: Path) -> Path:
    """The fine-tuning records (after --category and --limit, as the fine-tune reads them) as prompt/response
    JSONL: the data of ``--prune-data narrow``."""
    import json

    from ..core.data import DataSpec, load_records
    from ..finetune.train import resolve_data, subsample

    records = load_records(pick(DataSpec, cfg, data=resolve_data(cfg.train_data)))
    records = [records[i] for i in subsample(len(records), cfg.limit, cfg.seed)]
    path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response,
                                        "category": r.category}, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def random_step(cfg: EMExperimentConfig, out: Path, pruned: Path) -> Path:
    """The same-size random control: ``prune --control random`` with the pruned checkpoint's own scores
    and settings; when those scores no longer exist, the identical selection from its mask alone."""
    if cfg.random_control:
        return Path(cfg.random_control)
    target = out / "random"
    if done(target, "prune", "random control"):
        return target
    from ..pruning.prune import PruneConfig, prune

    pc = manifest.read_json(pruned / DONE_FILES["prune"])
    s = pc.get("settings", {})
    harm, benign = s.get("harm_scores", s.get("harm")), s.get("benign_scores", s.get("benign"))  # old name: harm
    if pc.get("stage") == "prune" and harm and Path(harm).is_dir() and (not benign or Path(benign).is_dir()):
        return prune(PruneConfig(harm_scores=harm, benign_scores=benign, q=s["q"], p=s["p"], out=str(target),
                                 model=s.get("model", cfg.model), scope=s.get("scope", "matrix"), control="random",
                                 seed=cfg.seed, overwrite=True, dtype=s.get("dtype"), device=cfg.device_name()))
    return random_from_mask(cfg, pruned, target)


def random_from_mask(cfg: EMExperimentConfig, pruned: Path, target: Path) -> Path:
    from ..core.models import load_model, model_hash
    from ..pruning.apply import apply_mask
    from ..pruning.checkpoint import MASK_FILE, load_mask, original_tokenizer, save_checkpoint
    from ..pruning.select import mask_stats, random_control

    mask = random_control(load_mask(pruned), cfg.seed)
    model, _ = load_model(cfg.model, cfg.dtype, cfg.device_name())
    source_hash = model_hash(model)
    apply_mask(model, mask, "zero")
    config = {"stage": "prune", "settings": {"control": "random", "seed": cfg.seed, "model": cfg.model},
              "selection": "control:random (same count per matrix as the source mask)",
              "model": {"spec": cfg.model, "model_hash": source_hash},
              "source_mask": {"path": str(pruned / MASK_FILE), "sha256": manifest.sha256_file(pruned / MASK_FILE)},
              **mask_stats(mask), "versions": manifest.versions()}
    return save_checkpoint(target, model, original_tokenizer(cfg.model), mask, config, overwrite=True)


def finetune_step(cfg: EMExperimentConfig, out: Path, arm: str, base: str, mask: Path | None) -> Path:
    """Fine-tune ``base``; returns the directory of the model to evaluate (merged for LoRA)."""
    from ..finetune import FinetuneConfig, finetune

    target = out / f"ft-{arm}"
    model_dir = target if cfg.full else target / "merged"
    if done(target, "finetune", f"fine-tune of {arm}"):
        return model_dir
    finetune(pick(FinetuneConfig, cfg, out=str(target), model=base, merge=not cfg.full,
                  keep_mask=str(mask) if mask else None, device=cfg.device_name(), resume=True,
                  load_in_8bit=False, load_in_4bit=False, targets=[], ignore=[], format="auto"))
    return model_dir


def em_config(cfg: EMExperimentConfig, model: str, out: Path) -> em.EMConfig:
    return pick(em.EMConfig, cfg, out=str(out), model=model, overwrite=True)


class LazyJudge:
    """Build the judge once, on the first evaluation that needs it (all evaluations share it)."""

    def __init__(self, cfg: em.EMConfig):
        self.cfg, self.rater = cfg, None

    def get(self):
        if self.rater is None:
            self.rater = em.make_rater(self.cfg)
        return self.rater


def eval_step(cfg: EMExperimentConfig, out: Path, name: str, model: str, judge: LazyJudge) -> dict:
    target = out / "em" / name
    if not done(target, "eval", f"EM eval of {name}"):
        em.eval_em(em_config(cfg, model, target), judge=judge.get())
    doc = R.read_results(target)
    return {"name": name, "model": model, "dir": str(target), **doc["results"]["em"]}


def broad_categories(cfg: EMExperimentConfig) -> list[str]:
    """The held-out harm categories other than the narrow fine-tuning domain (order of first appearance)."""
    from ..core.data import DataSpec, load_records

    narrow = {c.lower() for c in DataSpec(data=cfg.train_data, category=cfg.category).categories()}
    cats = dict.fromkeys(r.category for r in load_records(DataSpec(data=BROAD_PROMPTS)) if r.category)
    return [c for c in cats if c.lower() not in narrow]


def harm_step(cfg: EMExperimentConfig, out: Path, name: str, model: str, cats: list[str]) -> dict:
    """``eval harm`` (no attack, greedy) of one model on the other categories' held-out prompts."""
    from ..evals.generation import GenConfig
    from ..evals.harm import HarmConfig, eval_harm

    target = out / "harm" / name
    if not done(target, "eval", f"broad-harm eval of {name}"):
        eval_harm(HarmConfig(model=model, out=str(target), overwrite=True, prompts=BROAD_PROMPTS, category=",".join(cats),
                             judge=BROAD_JUDGES, limit=cfg.broad_limit, device=cfg.device, dtype=cfg.dtype),
                  GenConfig(max_new_tokens=cfg.broad_tokens, gen_batch_size=8, seed=cfg.seed, backend=cfg.backend))
    res = R.read_results(target)["results"]
    return {"name": name, "dir": str(target), **{j: res[f"harm/{j}"] for j in BROAD_JUDGES.split(",")}}


# ---------------------------------------------------------------- report


def rows_table(rows: list[dict]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def rate_ci(r):
        if r["misaligned_rate"] is None:
            return "n/a (no judged answers)"
        return f"{pct(r['misaligned_rate'])} [{pct(r['misaligned_rate_ci_low'])}, {pct(r['misaligned_rate_ci_high'])}]"

    body = [[r["arm"], "yes" if r["tuned"] else "no", rate_ci(r),
             r["n_judged"], R.fmt(r["mean_aligned"], 1), R.fmt(r["mean_coherent"], 1)] for r in rows]
    return R.md_table(["model", "tuned?", "misaligned [95% CI]", "n judged", "mean aligned", "mean coherent"], body)


def plot_rates(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars (per arm: before / after fine-tuning) of the misaligned rate with 95% CI error bars;
    a bar with no judged answers is marked "no judged answers" instead of drawn as 0."""
    from matplotlib.patches import Patch

    from ..core.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    handles = []
    width = 0.38
    top = 5.0
    for j, (tuned, color, label) in enumerate(((False, "#9bb7d4", "before fine-tune"),
                                               (True, "#c0504d", "after narrow fine-tune"))):
        handles.append(Patch(color=color, label=label))  # legend entry even when every bar is missing
        for i, arm in enumerate(ARMS):
            r = next((r for r in rows if r["arm"] == arm and r["tuned"] == tuned), None)
            x = i + (j - 0.5) * width
            if r is None or r["misaligned_rate"] is None:
                ax.text(x, 0.02, "no judged\nanswers", ha="center", va="bottom", fontsize=8, rotation=90,
                        transform=ax.get_xaxis_transform(), color="0.4")
                continue
            y, lo, hi = (100 * r[k] for k in ("misaligned_rate", "misaligned_rate_ci_low", "misaligned_rate_ci_high"))
            ax.bar(x, y, width, yerr=[[y - lo], [hi - y]], capsize=4, color=color)
            ax.text(x, hi, f"n={r['n_judged']}", ha="center", va="bottom", fontsize=8)
            top = max(top, hi * 1.15)
    ax.set_xticks(range(len(ARMS)), ["original", "harm-pruned", "random control"], fontsize=11)
    ax.set_xlim(-0.6, len(ARMS) - 0.4)
    ax.set_ylim(0, min(100.0, top))
    ax.set_ylabel("misaligned answers (%), 95% CI", fontsize=11)
    ax.set_title(title, fontsize=10)
    ax.legend(handles=handles, fontsize=9, frameon=False, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def harm_table(rows: list[dict]) -> str:
    def cell(m, key):
        se = m.get(f"{key}_stderr")
        return "n/a" if m.get(key) is None else f"{m[key]:.3f}" + (f" ± {1.96 * se:.3f}" if se is not None else "")

    body = [[r["arm"], "yes" if r["tuned"] else "no", cell(r["keyword"], "score"), cell(r["classifier"], "score"),
             cell(r["classifier"], "refusal_rate"), r["classifier"]["samples"]] for r in rows]
    return R.md_table(["model", "tuned?", "harmful (keyword) ± 95%", "harmful (classifier) ± 95%",
                       "refusal (classifier) ± 95%", "prompts"], body)


def plot_harm(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars (per arm: before / after the narrow fine-tune) of the classifier's mean harmfulness."""
    from ..core.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    width = 0.38
    for j, (tuned, color, label) in enumerate(((False, "#9bb7d4", "before fine-tune"),
                                               (True, "#c0504d", "after narrow fine-tune"))):
        xs, ys, es = [], [], []
        for i, arm in enumerate(ARMS):
            r = next((r for r in rows if r["arm"] == arm and r["tuned"] == tuned), None)
            if r is None or r["classifier"].get("score") is None:
                continue
            xs.append(i + (j - 0.5) * width)
            ys.append(r["classifier"]["score"])
            es.append(1.96 * (r["classifier"].get("score_stderr") or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=4, color=color, label=label)
    ax.set_xticks(range(len(ARMS)), ["original", "harm-pruned", "random control"], fontsize=11)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judged harmfulness (classifier), other categories", fontsize=10)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9, frameon=False, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def experiment_report(cfg: EMExperimentConfig, rows: list[dict], info: dict, harm_rows: list[dict] | None = None,
                      cats: list[str] | None = None) -> str:
    lines = ["# Emergent misalignment after narrow fine-tuning: original vs harm-pruned vs random control", "",
             f"- model: `{cfg.model}`; fine-tuning data: `{cfg.train_data}`"
             f"{f' (category {cfg.category})' if cfg.category else ''}"
             f"{f' (limit {cfg.limit} records)' if cfg.limit else ''}; {'full' if cfg.full else 'LoRA (merged)'} "
             "fine-tune, pruned and control masks kept at exactly 0",
             f"- pruned set from: {'the fine-tuning data itself (narrow-domain pruning)' if cfg.prune_data == 'narrow' else 'the general harm data (as make prune)'}",
             f"- pruned: `{info['pruned']}` ({info['pruned_count']} weights); random control: `{info['random']}` "
             f"({info['random_count']} weights, same count per matrix)",
             f"- judge: `{cfg.judge}`; questions: {cfg.questions}"
             f"{f' (first {cfg.limit_questions})' if cfg.limit_questions else ''}; {cfg.n} answers each, "
             f"temperature 1, {cfg.max_new_tokens} new tokens",
             f"- {em.RULE}", f"- interval: {em.INTERVAL}", "", rows_table(rows),
             "![misaligned rate](em_rates.png)", "",
             "Per-model details (per question, samples, judge outputs): `em/<model>/`. "
             f"Wall time of this invocation {info['wall_seconds']:.0f} s (finished steps are re-used)."]
    if cfg.judge.startswith(("fake", "hf:smollm2")):
        lines += ["", "**Note:** this judge is far too weak for meaningful verdicts; the run only proves the "
                      "pipeline. See docs/em.md for a real run."]
    if cfg.judge.startswith("em-classifier"):
        lines += ["", "Judge: the shipped offline EM judge (TF-IDF + logistic regression trained on GPT-4o's ratings "
                      "of Qwen2.5 answers; validation by held-out run in harmprune/evals/JUDGES.md). It reads "
                      "wording, not intent: read the examples in `em/<model>/report.md` before trusting a rate."]
    if harm_rows:
        lines += ["", "## Narrow harm -> broad harm", "",
                  f"Fine-tuned on the harmful train replies of {cfg.category}; judged harmfulness of greedy replies "
                  f"(no attack, {cfg.broad_tokens} new tokens) to the held-out `{BROAD_PROMPTS}` prompts of the other "
                  f"categories ({', '.join(cats or [])}); keyword and classifier judges, harmfulness in [0, 1], "
                  "higher = more harmful; ± = 1.96 standard errors.", "", harm_table(harm_rows),
                  "![broad harm](harm_broad.png)", "", "Per-model details: `harm/<model>/`."]
    return "\n".join(lines) + "\n"


def _count(ckpt: Path) -> int | None:
    f = ckpt / DONE_FILES["prune"]
    return manifest.read_json(f).get("total_pruned") if f.is_file() else None


def run_em_experiment(cfg: EMExperimentConfig) -> Path:
    """Run (or finish) the whole experiment in ``cfg.out_dir()``; returns it."""
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    manifest.banner("em-experiment", {**to_dict(cfg), "out": str(out)})
    judge = LazyJudge(em_config(cfg, cfg.model, out))
    with manifest.Stopwatch() as sw:
        pruned = pruned_step(cfg, out)
        rand = random_step(cfg, out, pruned)
        bases = {"original": (cfg.model, None), "pruned": (str(pruned), pruned / "mask.safetensors"),
                 "random": (str(rand), rand / "mask.safetensors")}
        tuned = {arm: finetune_step(cfg, out, arm, base, mask) for arm, (base, mask) in bases.items()}
        rows, harm_rows = [], []
        cats = broad_categories(cfg) if cfg.narrow_harm() else None
        for arm in ARMS:
            for is_tuned, model in ((False, bases[arm][0]), (True, str(tuned[arm]))):
                name = f"{arm}-tuned" if is_tuned else arm
                rows.append({"arm": arm, "tuned": is_tuned, **eval_step(cfg, out, name, model, judge)})
                if cats:
                    harm_rows.append({"arm": arm, "tuned": is_tuned, **harm_step(cfg, out, name, model, cats)})
    info = {"pruned": str(pruned), "pruned_count": _count(pruned), "random": str(rand), "random_count": _count(rand),
            "wall_seconds": sw.seconds}
    if info["pruned_count"] != info["random_count"]:
        raise HarmpruneError(f"the random control ({info['random_count']} weights) is not the size of the pruned set "
                             f"({info['pruned_count']}); pass a matching --random-control or remove {rand}")
    data = f"{cfg.train_data}" + (f" ({cfg.category})" if cfg.category else "")
    plot_rates(rows, out / "em_rates.png", f"{cfg.model} fine-tuned on {data}: judge {cfg.judge}")
    if harm_rows:
        plot_harm(harm_rows, out / "harm_broad.png", f"{cfg.model} fine-tuned on {data}: harm in the other categories")
    (out / "report.md").write_text(experiment_report(cfg, rows, info, harm_rows, cats), encoding="utf-8")
    results = {f"em/{r['name']}": r for r in rows} | {f"harm_broad/{r['name']}": r for r in harm_rows}
    manifest.write_config(out, "em-experiment", cfg, out=str(out))
    manifest.write_json(out / "experiment.json", R.results_doc(to_dict(cfg), results, **info, broad_categories=cats,
                                                               finetuned={a: str(p) for a, p in tuned.items()}))
    print(f"\n{rows_table(rows)}\n" + (f"\n{harm_table(harm_rows)}\n" if harm_rows else "")
          + f"harmprune: em-experiment -> {out}/report.md, {out}/em_rates.png")
    return out
