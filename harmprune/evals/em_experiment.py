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
from ..core.models import DEFAULT_MODEL
from ..core.settings import add_arguments, check, from_namespace, opt, to_dict
from . import em
from . import results as R

ARMS = ("original", "pruned", "random")
DONE_FILES = {"prune": "prune_config.json", "finetune": "finetune_config.json", "eval": R.RESULTS_FILE}


@dataclass
class EMExperimentConfig:
    judge: str | None = opt(None, help="0-100 rating judge: openai:<model> (with --judge-url), hf:<model>, fake (tests)")
    model: str = opt(DEFAULT_MODEL, help="original model: Hub id, checkpoint dir, .gguf or alias")
    data: str = opt("insecure", help="narrow fine-tuning data (chat rows); default: Betley et al.'s insecure code")
    out: str | None = opt(None, help="experiment directory (default: results/em-<model>)")
    pruned: str | None = opt(None, help="existing pruned checkpoint (make prune output) instead of running the pipeline")
    random_control: str | None = opt(None, help="existing random-control checkpoint instead of pruning one")
    judge_url: str | None = opt(None, help="OpenAI-compatible endpoint for openai:<model>")
    judge_device: str = opt("auto", help="device of an hf:<model> judge")
    judge_dtype: str = opt("float32", help="dtype of an hf:<model> judge")
    # pruning (used only without --pruned)
    q: float | None = opt(None, help="pipeline q (default: the pipeline's)")
    p: float | None = opt(None, help="pipeline p (default: the pipeline's)")
    prune_nsamples: int = opt(128, help="records scored per dataset by the pipeline")
    prune_eval_nsamples: int = opt(0, help="held-out records per set in the pipeline's NLL table (0 = all)")
    prune_max_length: int = opt(256, help="tokens per record when scoring")
    # fine-tuning
    full: bool = opt(False, help="full fine-tuning instead of LoRA")
    limit: int | None = opt(None, help="fine-tune on a seeded subset of this many records")
    lr: float = opt(1e-5, help="fine-tuning learning rate")
    epochs: int = opt(1, help="fine-tuning epochs")
    max_steps: int | None = opt(None, help="stop fine-tuning after this many optimizer steps")
    batch_size: int = opt(2, help="fine-tuning records per micro-batch")
    grad_accum: int = opt(8, help="fine-tuning micro-batches per optimizer step")
    max_length: int = opt(2048, help="fine-tuning tokens per record")
    # EM evaluation
    questions: str = opt("first_plot", help="first_plot, preregistered or a YAML file")
    n: int = opt(50, help="answers per question")
    max_new_tokens: int = opt(600, help="most new tokens per answer")
    limit_questions: int | None = opt(None, help="ask only the first K questions")
    include_json: bool = opt(False, help="also ask the _json / _template variants")
    domain_judge: str | None = opt(None, help="in-domain judge: " + ", ".join(em.DOMAINS) + " or a prompt file")
    gen_batch_size: int = opt(1, help="questions per generation batch (each holds n sequences)")
    backend: str = opt("hf", help="generation backend: hf, vllm or auto", choices=["hf", "vllm", "auto"])
    load_in_8bit: bool = opt(False, help="evaluate the six models loaded in 8-bit (bitsandbytes, CUDA; EM eval only)")
    load_in_4bit: bool = opt(False, help="evaluate the six models loaded in 4-bit NF4 (bitsandbytes, CUDA; EM eval only)")
    seed: int = opt(0, help="seed of pruning control, fine-tuning, sampling and bootstrap")
    dtype: str = opt("float32", help="dtype of the models")
    device: str = opt("auto", help="device (auto = cuda when available)")

    def __post_init__(self):
        check(bool(self.judge), em.missing_judge_message())
        validate.check_device(self.device, allow_auto=True)
        check(self.judge.partition(":")[0] in em.RATING_JUDGES, f"judge {self.judge!r} cannot rate 0-100")
        check(self.pruned is None or Path(self.pruned, DONE_FILES["prune"]).is_file(),
              f"--pruned {self.pruned}: not a pruned checkpoint (no {DONE_FILES['prune']})")
        check(self.random_control is None or Path(self.random_control, "mask.safetensors").is_file(),
              f"--random-control {self.random_control}: no mask.safetensors there")
        check(self.n >= 1 and self.max_new_tokens >= 1, "--n and --max-new-tokens must be >= 1")
        check(not (self.load_in_8bit and self.load_in_4bit), "--load-in-8bit and --load-in-4bit exclude each other")

    def out_dir(self) -> Path:
        from ..core.models import model_name

        return Path(self.out) if self.out else Path("results") / f"em-{model_name(self.model)}"

    def device_name(self) -> str:
        import torch

        return self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def done(path: Path, kind: str) -> bool:
    return (path / DONE_FILES[kind]).is_file()


def _skip(what: str, path: Path) -> None:
    print(f"harmprune: em-experiment: {what} already done in {path}, re-using it", file=sys.stderr)


# ---------------------------------------------------------------- steps


def pruned_step(cfg: EMExperimentConfig, out: Path) -> Path:
    if cfg.pruned:
        return Path(cfg.pruned)
    target = out / "pruned"
    if done(target, "prune"):
        _skip("pruning", target)
        return target
    from ..pruning.pipeline import PipelineConfig, run_pipeline

    kw = {k: v for k, v in {"q": cfg.q, "p": cfg.p}.items() if v is not None}
    return run_pipeline(PipelineConfig(model=cfg.model, out=str(target), nsamples=cfg.prune_nsamples,
                                       eval_nsamples=cfg.prune_eval_nsamples, max_length=cfg.prune_max_length,
                                       scores_dir=str(out / "scores"), seed=cfg.seed, dtype=cfg.dtype,
                                       device=cfg.device_name(), overwrite=True, **kw))


def random_step(cfg: EMExperimentConfig, out: Path, pruned: Path) -> Path:
    """The same-size random control: ``prune --control random`` with the pruned checkpoint's own scores
    and settings; when those scores no longer exist, the identical selection from its mask alone."""
    if cfg.random_control:
        return Path(cfg.random_control)
    target = out / "random"
    if done(target, "prune"):
        _skip("random control", target)
        return target
    from ..pruning.prune import PruneConfig, prune

    pc = manifest.read_json(pruned / DONE_FILES["prune"])
    s = pc.get("settings", {})
    if pc.get("stage") == "prune" and s.get("harm") and Path(s["harm"]).is_dir() and \
            (not s.get("benign") or Path(s["benign"]).is_dir()):
        return prune(PruneConfig(harm=s["harm"], benign=s.get("benign"), q=s["q"], p=s["p"], out=str(target),
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
    if done(target, "finetune"):
        _skip(f"fine-tune of {arm}", target)
        return model_dir
    finetune(FinetuneConfig(data=cfg.data, out=str(target), model=base, full=cfg.full, merge=not cfg.full,
                            keep_mask=str(mask) if mask else None, lr=cfg.lr, epochs=cfg.epochs,
                            max_steps=cfg.max_steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                            max_length=cfg.max_length, limit=cfg.limit, seed=cfg.seed, dtype=cfg.dtype,
                            device=cfg.device_name(), resume=True))
    return model_dir


def em_config(cfg: EMExperimentConfig, model: str, out: Path) -> em.EMConfig:
    return em.EMConfig(out=str(out), model=model, judge=cfg.judge, judge_url=cfg.judge_url,
                       judge_device=cfg.judge_device, judge_dtype=cfg.judge_dtype, questions=cfg.questions,
                       include_json=cfg.include_json, limit_questions=cfg.limit_questions,
                       domain_judge=cfg.domain_judge, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.gen_batch_size, backend=cfg.backend, seed=cfg.seed, dtype=cfg.dtype,
                       device=cfg.device, load_in_8bit=cfg.load_in_8bit, load_in_4bit=cfg.load_in_4bit, overwrite=True)


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
    if done(target, "eval"):
        _skip(f"EM eval of {name}", target)
    else:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def experiment_report(cfg: EMExperimentConfig, rows: list[dict], info: dict) -> str:
    lines = ["# Emergent misalignment after narrow fine-tuning: original vs harm-pruned vs random control", "",
             f"- model: `{cfg.model}`; fine-tuning data: `{cfg.data}`"
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
    plot_rates(rows, out / "em_rates.png", f"{cfg.model} fine-tuned on {cfg.data}: judge {cfg.judge}")
    (out / "report.md").write_text(experiment_report(cfg, rows, info), encoding="utf-8")
    manifest.write_json(out / "experiment.json", R.results_doc(to_dict(cfg), {f"em/{r['name']}": r for r in rows},
                                                               **info, finetuned={a: str(p) for a, p in tuned.items()}))
    print(f"\n{rows_table(rows)}\nharmprune: em-experiment -> {out}/report.md, {out}/em_rates.png")
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "em-experiment", help="EM experiment: original / harm-pruned / random control, each fine-tuned, then eval em",
        description="Emergent-misalignment experiment with controls: fine-tune the original, the harm-pruned and a "
                    "same-size random-control model on narrow data (masks kept at 0), evaluate EM of all six "
                    "models, and write report.md and em_rates.png. Re-running skips finished steps.")
    add_arguments(p, EMExperimentConfig)
    p.set_defaults(func=lambda ns: run_em_experiment(from_namespace(EMExperimentConfig, ns)))
