"""``harmprune em-experiment`` (``make em``): does pruning harm weights stop emergent misalignment?

Steps, each written to its own sub-directory of ``out`` and skipped when already complete there
(so an interrupted experiment continues where it stopped; a fine-tune continues from its last
checkpoint):

1. ``pruned/``: the harm-specific pruned checkpoint (``run_pipeline``), or ``--pruned DIR``.
2. ``random/``: a random control with the same count per matrix (``prune --control random`` from
   the pruned checkpoint's scores; from its mask alone when those scores are gone).
3. ``ft-{original,pruned,random}/``: fine-tune each on the narrow data; pruned and random keep their
   mask (``--keep-mask``, merged LoRA or masked full fine-tune), so pruned weights stay exactly 0.
4. ``em/{original,pruned,random}{,-tuned}/``: ``eval em`` of all six models with one judge.

Then ``report.md`` (table: model, tuned?, misaligned rate [95% CI], n judged, mean aligned, mean
coherent), ``em_rates.png`` (bars with the intervals) and ``experiment.json`` (settings, versions,
paths, every number), all computed from the step outputs of this run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.errors import HarmpruneError
from ..core.options import (BackendOptions, EMQuestionOptions, EMSamplingOptions, EvalSetOptions, JudgeOptions,
                            LimitOptions, ModelOptions, OutputOptions, PrunedOptions, QuantizeOptions,
                            RatingJudgeOptions, ScoringOptions, SelectionOptions, TrainDataOptions, TrainOptions,
                            check_sampling, pick)
from ..core.settings import check, opt, to_dict
from ..evals import em
from ..evals import results as R

ARMS = ("original", "pruned", "random")
DONE_FILES = {"prune": "prune_config.json", "finetune": "finetune_config.json", "eval": R.RESULTS_FILE}


@dataclass(kw_only=True)
class EMExperimentConfig(ModelOptions, RatingJudgeOptions, JudgeOptions, TrainDataOptions, OutputOptions,
                         SelectionOptions, ScoringOptions, EvalSetOptions, TrainOptions, LimitOptions,
                         EMQuestionOptions, EMSamplingOptions, BackendOptions, QuantizeOptions, PrunedOptions):
    """Settings of ``harmprune em-experiment``; ``--out`` defaults to results/em-<model>. Pruning (without
    ``--pruned``) runs the pipeline with ``--q``/``--p``/scoring options; ``--limit`` subsets the fine-tuning
    data; quantized loading applies to the EM evaluation only; ``--seed`` seeds everything."""

    random_control: str | None = opt(None, help="existing random-control checkpoint instead of pruning one", role="input")

    def __post_init__(self):
        em.check_rating_judge(self.judge)
        validate.check_device(self.device, allow_auto=True)
        check(self.pruned is None or Path(self.pruned, DONE_FILES["prune"]).is_file(),
              f"--pruned {self.pruned}: not a pruned checkpoint (no {DONE_FILES['prune']})")
        check(self.random_control is None or Path(self.random_control, "mask.safetensors").is_file(),
              f"--random-control {self.random_control}: no mask.safetensors there")
        check_sampling(self)
        check(not (self.load_in_8bit and self.load_in_4bit), "--load-in-8bit and --load-in-4bit exclude each other")

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

    return run_pipeline(pick(PipelineConfig, cfg, out=str(target), scores_dir=str(out / "scores"),
                             device=cfg.device_name(), overwrite=True))


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

    from .ablation.plots import pyplot, save

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


def experiment_report(cfg: EMExperimentConfig, rows: list[dict], info: dict) -> str:
    lines = ["# Emergent misalignment after narrow fine-tuning: original vs harm-pruned vs random control", "",
             f"- model: `{cfg.model}`; fine-tuning data: `{cfg.train_data}`"
             f"{f' (limit {cfg.limit} records)' if cfg.limit else ''}; {'full' if cfg.full else 'LoRA (merged)'} "
             "fine-tune, pruned and control masks kept at exactly 0",
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
        rows = []
        for arm in ARMS:
            for is_tuned, model in ((False, bases[arm][0]), (True, str(tuned[arm]))):
                r = eval_step(cfg, out, f"{arm}-tuned" if is_tuned else arm, model, judge)
                rows.append({"arm": arm, "tuned": is_tuned, **r})
    info = {"pruned": str(pruned), "pruned_count": _count(pruned), "random": str(rand), "random_count": _count(rand),
            "wall_seconds": sw.seconds}
    if info["pruned_count"] != info["random_count"]:
        raise HarmpruneError(f"the random control ({info['random_count']} weights) is not the size of the pruned set "
                             f"({info['pruned_count']}); pass a matching --random-control or remove {rand}")
    plot_rates(rows, out / "em_rates.png", f"{cfg.model} fine-tuned on {cfg.train_data}: judge {cfg.judge}")
    (out / "report.md").write_text(experiment_report(cfg, rows, info), encoding="utf-8")
    manifest.write_json(out / "experiment.json", R.results_doc(to_dict(cfg), {f"em/{r['name']}": r for r in rows},
                                                               **info, finetuned={a: str(p) for a, p in tuned.items()}))
    print(f"\n{rows_table(rows)}\nharmprune: em-experiment -> {out}/report.md, {out}/em_rates.png")
    return out
