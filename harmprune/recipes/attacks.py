"""``harmprune attack`` (``make attack``): B-TAP's fine-tuning and refusal-ablation attacks on the original
model, the harm-pruned model (``--pruned``, a ``make prune`` output) and its same-size random control
(``pruning.select.random_control(mask, --seed)``, as the pipeline draws it), each measured with the
headline table (``evals.headline``: judged harmfulness / refusal with and without the prefill attack,
benign NLL, XSTest compliance, corpus perplexity, 95 % intervals). Every run also measures ``original``
(no attack), so the table shows what the attack does.

``--attack finetune``: a LoRA (``--full``: full) fine-tune on the shipped ``harmful`` train split
(``--limit`` records, ``--max-steps`` steps); a prompt shared with the measured held-out harmful
prompts is refused. Arms, each fine-tuned from the original weights with the same data and seed:
- ``original+ft``: the original model;
- ``pruned+ft``: the harm set zeroed, then fine-tuned with the mask kept: LoRA leaves the base weights
  frozen at 0 and the merged weight is re-zeroed (``finetune.masking.masked_merge``); ``--full`` zeroes
  them after every step. The pruned weights are exactly 0 when measured;
- ``pruned+ft-free``: the harm set zeroed before the fine-tune, the adapter merged over it without
  re-zeroing (``--full``: never re-zeroed), so the pruned weights may re-learn;
- ``random+ft``: the random control, mask kept as in ``pruned+ft``.
Each arm reports ``mask_nonzero_after``: how many of its zeroed weights are not 0 when measured.

``--attack refusal-ablation``: the refusal set ``A = Top_q(|SNIP| on refusal data) \\ Top_p(benign)``
(``--refusal-q``, ``--refusal-p``, ``--scope``; benign as ``--benign``/``--benign-method``; both scored
through the score cache with the scoring options). Refusal data: the harmful requests of the shipped
alignment data (``align_data``), each with its templated refusal (``align_data.refusal``), minus any
measured held-out prompt. Arms: ``original+abl`` = A zeroed, ``pruned+abl`` = A and the harm set,
``random+abl`` = A and the random control.

``--out`` (default ``results/attack-<attack>-<model>``): ``results.json`` (the headline results plus
``attack``: settings, data, masks, fine-tune losses), ``table.md``, ``headline.png``,
``headline_samples.jsonl`` (``headline.write_headline``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.data import DataSpec, Record, load_records
from ..core.errors import HarmpruneError
from ..core.models import load_model, model_name, resolve_device
from ..core.options import (BenignOptions, CacheOptions, CorpusOptions, EvalHarmOptions, EvalSetOptions,
                            GenBatchOptions, LimitOptions, LoraOptions, ModelOptions, NewTokensOptions, OutputOptions,
                            PrunedOptions, ScopeOptions, ScoringOptions, TrainOptions, HarmJudgeOptions, JudgeOptions,
                            PrefillAttackOptions, check_scoring, pick)
from ..core.settings import check, opt, to_dict
from ..evals import results as R
from ..evals.align_data import load_rows, training_records
from ..evals.headline import HeadlineConfig, HeadlineData, default_data, measure_masks, write_headline
from ..evals.harm import judge_options
from ..finetune.masking import bind_mask, masked_merge
from ..finetune.train import (FinetuneConfig, Plan, TrainState, check_plan, load_training_data, make_optimizer,
                              prepare_model, train)
from ..pruning.checkpoint import CONFIG_FILE, MASK_FILE, load_mask
from ..pruning.harmset import harm_set, scores_of
from ..pruning.masks import count, intersection, union
from ..pruning.select import random_control

ATTACKS = ("finetune", "refusal-ablation")
FT_DATA = "harmful"  # the shipped train split; the measurement's harmful prompts are harmful:test
REFUSAL_METHOD = "snip-abs"  # B-TAP scores refusal data with |SNIP|


@dataclass(kw_only=True)
class AttackConfig(ModelOptions, PrunedOptions, OutputOptions, EvalHarmOptions, BenignOptions, EvalSetOptions,
                   NewTokensOptions, GenBatchOptions, CorpusOptions, TrainOptions, LoraOptions, LimitOptions,
                   ScoringOptions, CacheOptions, ScopeOptions, HarmJudgeOptions, JudgeOptions, PrefillAttackOptions):
    """Settings of ``harmprune attack``. ``--eval-nsamples`` caps every measured held-out set (harmful,
    XSTest, benign); ``--limit`` the fine-tuning records; the scoring options apply to the refusal and
    benign scores; ``--seed`` seeds the random control, data subsets, LoRA init and bootstrap."""

    attack: str = opt(help="the attack: finetune (LoRA on harmful data) or refusal-ablation (prune the refusal "
                           "weights)", choices=list(ATTACKS))
    refusal_q: float = opt(0.01, help="refusal-ablation: fraction of each unit's weights in Top_q of the refusal "
                                      "|SNIP|, in [0, 1]", range="[0, 1]")
    refusal_p: float = opt(0.1, help="refusal-ablation: fraction protected by Top_p of the benign importance, "
                                      "in [0, 1]", range="[0, 1]")

    def __post_init__(self):
        check(self.attack in ATTACKS, f"--attack must be one of {', '.join(ATTACKS)}")
        check(self.pruned is not None, "--pruned DIR is required: a make prune output directory")
        check(Path(self.pruned, MASK_FILE).is_file(), f"--pruned {self.pruned}: no {MASK_FILE} there (not a make "
                                                       "prune output directory)")
        check_scoring(self)
        validate.check_fraction(self.refusal_q, "--refusal-q")
        validate.check_fraction(self.refusal_p, "--refusal-p")
        check(self.eval_nsamples >= 0 and self.corpus_tokens >= 0,
              "--eval-nsamples and --corpus-tokens must be 0 (all) or positive")
        check(self.max_new_tokens >= 1 and self.gen_batch_size >= 0,
              "--max-new-tokens must be >= 1, --gen-batch-size >= 0 (0 = the device's default)")
        if self.attack == "finetune":
            self.finetune_config()  # the training settings fail now, not after the first measurement

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / f"attack-{self.attack}-{model_name(self.model)}"

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tune stage's settings; nothing is written (no checkpoints, the model stays in memory)."""
        return pick(FinetuneConfig, self, out=str(self.out_dir()), train_data=FT_DATA, save_steps=0,
                    keep_mask=None, merge=False, device=resolve_device(self.device))

    def headline_config(self) -> HeadlineConfig:
        return pick(HeadlineConfig, self)


# ---------------------------------------------------------------- inputs


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def shared_prompts(a: list[Record], b: list[Record]) -> list[str]:
    """Prompts of ``a`` that ``b`` also holds (case and whitespace ignored), in ``a``'s order."""
    held = {_norm(r.prompt) for r in b}
    return [r.prompt for r in a if _norm(r.prompt) in held]


def measurement_data(cfg: AttackConfig, tok) -> HeadlineData:
    """The headline's held-out sets, each capped at ``--eval-nsamples`` (benign too, unlike the pipeline)."""
    data = default_data(tok, harmful=cfg.eval_harm, benign=cfg.eval_benign, limit=cfg.eval_nsamples, seed=cfg.seed)
    data.benign = R.subsample(data.benign, cfg.eval_nsamples, cfg.seed, key=lambda r: r.category)
    data.about["benign"]["selected"] = len(data.benign)
    return data


def load_pruned(cfg: AttackConfig, handle) -> tuple[dict, dict]:
    """The harm mask of ``--pruned`` and what results.json records about it; refuses a mask made
    from other weights than ``--model``'s (its prune_config.json records the source model's hash)."""
    mask = load_mask(cfg.pruned)
    info = {"dir": str(cfg.pruned), "mask_sha256": manifest.sha256_file(Path(cfg.pruned, MASK_FILE)),
            "pruned_weights": count(mask)}
    pc_file = Path(cfg.pruned, CONFIG_FILE)
    if pc_file.is_file():
        pc = manifest.read_json(pc_file)
        source = pc.get("model") or {}
        if source.get("model_hash") and source["model_hash"] != handle.hash:
            raise HarmpruneError(f"--pruned {cfg.pruned} was pruned from {source.get('spec')}, not from --model "
                                 f"{cfg.model} (the weights differ); pass --model {source.get('spec')}")
        s = pc.get("settings", {})
        info.update(source=source, selection=pc.get("selection"), q=s.get("q"), p=s.get("p"), scope=s.get("scope"))
    return mask, info


# ---------------------------------------------------------------- finetune


def finetune_arm(fcfg: FinetuneConfig, items, pad_id: int, mask: dict | None, keep: bool):
    """Fine-tune ``fcfg.model`` with ``mask`` zeroed first; ``keep`` holds it at 0 through training and
    merging. Returns the plain (merged) model and its report (losses, ``mask_nonzero_after``)."""
    model, kept, _ = prepare_model(fcfg, fcfg.device, mask)
    plan = Plan(len(items), fcfg.train_batch_size, fcfg.grad_accum, fcfg.epochs, fcfg.seed, fcfg.max_steps)
    opt_, sched = make_optimizer(model, fcfg, plan.total)
    state = train(model, items, plan, fcfg, opt_, sched, TrainState(), kept if keep else None, pad_id,
                  fcfg.device, {})
    if not fcfg.full:
        model = masked_merge(model, mask if keep else None)
    report = {"mask_kept": keep, "zeroed_before": count(mask or {}), "steps": state.step, "losses": state.losses,
              "final_loss": state.losses[-1] if state.losses else None,
              "mask_nonzero_after": bind_mask(model, mask).nonzero() if mask else 0}
    return model, report


def run_finetune(cfg: AttackConfig, handle, masks: dict, data: HeadlineData, hcfg: HeadlineConfig):
    fcfg = cfg.finetune_config()
    tok = handle.tokenizer
    leaked = shared_prompts(load_records(DataSpec(data=FT_DATA)), data.harmful)
    if leaked:
        raise HarmpruneError(f"the fine-tuning data {FT_DATA} shares {len(leaked)} prompts with the measured "
                             f"--eval-harm {cfg.eval_harm}, e.g. {leaked[0][:60]!r}; measure on held-out prompts")
    items, data_info = load_training_data(fcfg, tok)
    check_plan(Plan(len(items), fcfg.train_batch_size, fcfg.grad_accum, fcfg.epochs, fcfg.seed, fcfg.max_steps), fcfg)
    results, samples = measure_masks(handle.model, tok, {"original": None}, data, hcfg, judge_opts=judge_options(cfg))
    handle.model.to("meta")  # free the original's memory: every arm loads its own copy
    arms = {"original+ft": (None, False), "pruned+ft": (masks["pruned"], True),
            "pruned+ft-free": (masks["pruned"], False), "random+ft": (masks["random"], True)}
    reports = {}
    for name, (mask, keep) in arms.items():
        model, reports[name] = finetune_arm(fcfg, items, tok.pad_token_id, mask, keep)
        r, s = measure_masks(model, tok, {name: mask if keep else None}, data, hcfg, judge_opts=judge_options(cfg))
        r["variants"][name].update(pruned_weights=count(mask or {}),
                                   mask_nonzero_after=reports[name]["mask_nonzero_after"])
        results["variants"].update(r["variants"])
        samples += s
        del model
    return results, samples, {"finetune": {"data": data_info, "mode": fcfg.mode, "arms": reports}}


# ---------------------------------------------------------------- refusal ablation


def refusal_records(seed: int, held_out: list[Record]) -> tuple[list[Record], int]:
    """Harmful requests of the shipped alignment data with their templated refusals, minus ``held_out``
    prompts; returns (records, how many were dropped)."""
    rows, _ = load_rows()
    recs = training_records([r for r in rows if r["kind"] == "refuse"], 0, 0, seed)
    drop = {_norm(p) for p in shared_prompts(recs, held_out)}
    return [r for r in recs if _norm(r.prompt) not in drop], len(drop)


def refusal_file(records: list[Record], scores_dir: str | Path) -> Path:
    """The refusal records as JSON lines under ``<scores_dir>/data/``, named by their sha256, so the score
    cache's entries point at a file that holds exactly what was scored."""
    text = "".join(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response, "category": r.category})
                   + "\n" for r in records)
    path = Path(scores_dir) / "data" / f"refusals-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.rename(path)
    return path


def run_refusal_ablation(cfg: AttackConfig, handle, masks: dict, data: HeadlineData, hcfg: HeadlineConfig):
    records, dropped = refusal_records(cfg.seed, data.harmful)
    path = refusal_file(records, cfg.scores_dir)
    ref = scores_of(handle, DataSpec(data=str(path)), REFUSAL_METHOD, cfg, cfg.scores_dir, rows=records,
                    label="refusals")
    ben = scores_of(handle, cfg.benign, cfg.benign_method, cfg, cfg.scores_dir) if cfg.refusal_p > 0 else None
    ablate, stats = harm_set(ref, ben, cfg.refusal_q, cfg.refusal_p, cfg.scope)  # Top_q(refusal) \ Top_p(benign)
    variants = {"original": None, "original+abl": ablate, "pruned+abl": union([ablate, masks["pruned"]]),
                "random+abl": union([ablate, masks["random"]])}
    results, samples = measure_masks(handle.model, handle.tokenizer, variants, data, hcfg, judge_opts=judge_options(cfg))
    info = {"data": {"file": str(path), "records": len(records), "dropped_held_out": dropped,
                     "source": "align.jsonl refuse rows, refusals from align_data.refusal templates"},
            "scores": {"refusal": str(ref.path), "benign": str(ben.path) if ben else None},
            "selection": f"Top_q({REFUSAL_METHOD} refusal) \\ Top_p({cfg.benign_method} benign)",
            "ablated_weights": stats["total_pruned"], "warnings": stats["warnings"],
            "overlap_with_pruned": intersection(masks["pruned"], ablate),
            "overlap_with_random": intersection(masks["random"], ablate)}
    return results, samples, {"refusal_ablation": info}


# ---------------------------------------------------------------- the command


def run_attack(cfg: AttackConfig) -> Path:
    """Run ``cfg.attack`` on original / pruned / random, measure each, and write ``cfg.out_dir()``."""
    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    manifest.banner(f"attack {cfg.attack}", {**to_dict(cfg), "out": str(out)})
    handle = load_model(cfg.model, cfg.dtype, cfg.device)
    mask, pruned_info = load_pruned(cfg, handle)
    masks = {"pruned": mask, "random": random_control(mask, cfg.seed)}
    hcfg = cfg.headline_config()
    data = measurement_data(cfg, handle.tokenizer)
    model_info = {"spec": cfg.model, "model_hash": handle.hash}
    run = run_finetune if cfg.attack == "finetune" else run_refusal_ablation
    with manifest.Stopwatch() as sw:
        results, samples, detail = run(cfg, handle, masks, data, hcfg)
    results["attack"] = {"name": cfg.attack, "config": to_dict(cfg), "model": model_info, "pruned": pruned_info,
                         "random_control": f"pruning.select.random_control(mask, seed={cfg.seed}): same count per "
                                           "matrix, uniform positions", **detail,
                         "wall_seconds": sw.seconds, "versions": manifest.versions()}
    with manifest.atomic_dir(out, overwrite=True) as tmp:
        table = write_headline(tmp, results, samples)
        manifest.write_config(tmp, "attack", cfg, out=str(out))
    print(f"\n{cfg.attack} attack ({model_info['spec']}; --pruned {cfg.pruned})\n{table}")
    return out
