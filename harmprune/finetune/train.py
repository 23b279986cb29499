"""The fine-tune stage: a narrow dataset in, a LoRA adapter (or full checkpoint) out, mask kept.

``finetune(FinetuneConfig(...))`` is both the Python API and ``harmprune finetune``. The loop is plain
PyTorch: per optimizer step, ``grad_accum`` micro-batches of ``batch_size`` records; the loss is the
mean NLL over all response tokens of the step (prompt tokens are -100, docs/design.md). Data order is a
seeded permutation per epoch, so a run resumed from ``DIR/checkpoints/step-N`` replays exactly the
steps an uninterrupted run would take.

Output ``DIR``: the adapter (``adapter_model.safetensors``, ``adapter_config.json``) or, with ``--full``,
a loadable HF checkpoint; the tokenizer; ``merged/`` with ``--merge`` (LoRA); ``mask.safetensors`` next
to any weights that keep the mask; ``finetune_config.json`` (settings, data hash and counts, mask
sha256, versions, losses). The final directory is written to a temporary sibling and renamed.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records, records_sha256
from ..core.errors import HarmpruneError, require
from ..core.formatting import IGNORE, collate, encode, resolve_format, token_nll
from ..core.models import bnb_config, load_model, load_tokenizer, model_hash, parse_dtype, resolve, resolve_device
from ..core.options import (CheckpointingOptions, FieldOptions, FormatOptions, LimitOptions, LoraOptions,
                            ModelOptions, OutputOptions, QuantizeOptions, ResumeOptions, SeedOptions, TargetOptions,
                            TrainDataOptions, TrainOptions)
from ..core.settings import check, check_min, opt, to_dict
from ..core.targets import select_linears
from .masking import BoundMask, bind_mask, masked_merge

CONFIG_FILE = "finetune_config.json"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SCHEDULES = ("linear", "cosine", "constant")
# Settings that may change between an interrupted run and its resumption.
RUN_ONLY = ("out", "resume", "overwrite", "save_steps", "merge", "device")
# Shipped data that the shared built-in registry does not list (it only knows split-filtered sets).
EM_BUILTINS = {"insecure": "em/insecure.jsonl.gz"}


@dataclass(kw_only=True)
class FinetuneConfig(ModelOptions, QuantizeOptions, OutputOptions, TrainDataOptions, TrainOptions, LoraOptions,
                     TargetOptions, LimitOptions, FieldOptions, FormatOptions, SeedOptions, CheckpointingOptions,
                     ResumeOptions):
    """Settings of ``harmprune finetune`` (``--load-in-4bit`` = QLoRA; ``--targets`` = LoRA modules; ``--seed``
    seeds the subset, the data order and the LoRA init; ``--limit`` takes a seeded subset)."""

    keep_mask: str | None = opt(None, help="mask.safetensors (or pruned checkpoint dir) whose entries stay exactly 0", role="input")
    merge: bool = opt(False, help="also save a merged checkpoint under DIR/merged (LoRA; applies --keep-mask)")
    schedule: str = opt("linear", help="learning-rate schedule after warmup", choices=SCHEDULES)
    weight_decay: float = opt(0.01, help="AdamW decoupled weight decay (matrices only, not biases/norms)", range=">= 0")
    max_grad_norm: float = opt(1.0, help="clip the gradient norm to this (0 = off)", range=">= 0")
    save_steps: int = opt(50, help="checkpoint every N optimizer steps under DIR/checkpoints (0 = never)", range=">= 0")

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        check(not self.load_in_8bit, "finetune loads 4-bit only (QLoRA: --load-in-4bit); --load-in-8bit is for evaluation")
        check_min(self, 1, "lora_r", "epochs", "max_steps", "train_batch_size", "grad_accum")
        check_min(self, 2, "train_max_length")
        check_min(self, 0, "warmup_steps", "weight_decay", "max_grad_norm", "limit", "save_steps")
        check(self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        check(0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        check(self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}")
        check(not (self.full and self.load_in_4bit), "--full and --load-in-4bit exclude each other (QLoRA trains adapters)")
        check(not (self.full and self.merge), "--merge is for LoRA; a --full run already saves a full checkpoint")
        parse_dtype(self.dtype)
        validate.check_finite(self.lr, "--lr")
        validate.check_device(self.device, allow_auto=True)

    @property
    def mode(self) -> str:
        return "full" if self.full else "qlora" if self.load_in_4bit else "lora"


# ---------------------------------------------------------------- data


def resolve_data(data: str) -> str:
    """Map the EM built-in names (``insecure``) to the shipped file; anything else passes through."""
    from .. import data as builtin

    if data in EM_BUILTINS and not Path(data).exists() and builtin.parse(data) is None:
        return str(builtin.path(EM_BUILTINS[data]))
    return data


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``limit`` of ``n`` records, in source order (0/None = all)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def load_training_data(cfg: FinetuneConfig, tok):
    """Records → encoded items with response-only labels, and the manifest's data entry."""
    spec = DataSpec(data=resolve_data(cfg.train_data), prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                    category_field=cfg.category_field, category=cfg.category)
    records = load_records(spec)
    fingerprint = data_fingerprint(spec, records)
    fingerprint["spec"]["data"] = cfg.train_data
    chosen = [records[i] for i in subsample(len(records), cfg.limit, cfg.seed)]
    fmt = resolve_format(tok, cfg.format)
    enc = encode(chosen, tok, fmt, cfg.train_max_length)
    if not enc.items:
        raise HarmpruneError(f"{cfg.train_data}: no record has a response token within --train-max-length "
                             f"{cfg.train_max_length}")
    if enc.skipped:
        validate.warn(f"{enc.skipped} of {len(chosen)} records were skipped: the prompt leaves no room for a response "
                      f"token within --train-max-length {cfg.train_max_length}; raise --train-max-length to use them")
    info = {**fingerprint, "format": fmt, "records_used": len(chosen), "records_sha256": records_sha256(chosen),
            "encoded": len(enc.items), "skipped": enc.skipped, "response_tokens": enc.tokens}
    return enc.items, info


# ---------------------------------------------------------------- loss and step plan


def response_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over response tokens (``core.formatting.token_nll``) and their count."""
    tok, mask = token_nll(logits, labels)
    return tok.sum(), int(mask.sum())


@dataclass
class Plan:
    """Which records each optimizer step uses: a seeded permutation per epoch, cut into micro-batches."""

    n: int
    batch_size: int
    grad_accum: int
    epochs: int
    seed: int
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.n / self.batch_size) / self.grad_accum)

    @property
    def total(self) -> int:
        return self.max_steps if self.max_steps else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """Record indices of each micro-batch of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        start = k * self.grad_accum * self.batch_size
        chunk = order[start : start + self.grad_accum * self.batch_size]
        return [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]


def check_plan(plan: "Plan", cfg: FinetuneConfig) -> None:
    """Refuse a run whose every optimizer step has learning rate 0 (linear warm-up starts at 0, so one
    step with warm-up changes nothing); warn when the learning rate never reaches --lr."""
    steps, warm = plan.total, cfg.warmup_steps
    fix = (f"{plan.n} records at --train-batch-size {cfg.train_batch_size} x --grad-accum {cfg.grad_accum} give "
           f"{plan.steps_per_epoch} optimizer step(s) per epoch")
    if warm > 0 and steps <= 1:
        raise HarmpruneError(f"fine-tuning would not change the weights: {steps} optimizer step at learning rate 0 "
                             f"(warm-up of {warm} steps starts at 0): {fix}; lower --grad-accum or --train-batch-size, "
                             "raise --epochs or --max-steps, or pass --warmup-steps 0")
    if warm > 0 and steps <= warm:
        validate.warn(f"the learning rate never leaves warm-up: {steps} optimizer steps <= --warmup-steps {warm}, so "
                      f"it peaks at {cfg.lr * (steps - 1) / warm:.2e}, not --lr {cfg.lr:g} ({fix})")


# ---------------------------------------------------------------- model set-up


def check_quantization(cfg: FinetuneConfig, device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes: fail before anything is loaded."""
    if not cfg.load_in_4bit:
        return
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise HarmpruneError("--load-in-4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install "
                             f"'harmprune[quant]'); device is {device!r}. On CPU, drop --load-in-4bit to train LoRA")
    require("bitsandbytes", "quant", "--load-in-4bit (QLoRA)")


def _load_4bit(cfg: FinetuneConfig):
    from transformers import AutoModelForCausalLM

    peft = require("peft", "finetune", "LoRA fine-tuning")
    path, gguf = resolve(cfg.model)
    if gguf:
        raise HarmpruneError("--load-in-4bit cannot quantize a .gguf file; pass a Hugging Face checkpoint")
    compute = torch.bfloat16 if cfg.dtype in ("float32", "fp32") else parse_dtype(cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config("4bit", compute), dtype=compute,
                                                 device_map={"": torch.cuda.current_device()})
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def lora_scale(cfg: FinetuneConfig) -> float:
    return cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.rslora else cfg.lora_r)


def add_lora(model, cfg: FinetuneConfig):
    """Wrap the model with LoRA on the linears ``select_linears`` matches (full module names)."""
    peft = require("peft", "finetune", "LoRA fine-tuning")
    names = list(select_linears(model, cfg.targets, cfg.ignore))
    lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           use_rslora=cfg.rslora, target_modules=names, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # LoRA A init
    return peft.get_peft_model(model, lcfg), names


def load_keep_mask(cfg: FinetuneConfig) -> tuple[dict | None, dict | None]:
    if cfg.keep_mask is None:
        return None, None
    from ..pruning.checkpoint import MASK_FILE, load_mask
    from ..pruning.masks import count

    mask = load_mask(cfg.keep_mask)
    path = Path(cfg.keep_mask)
    path = path / MASK_FILE if path.is_dir() else path
    return mask, {"path": str(path), "sha256": manifest.sha256_file(path), "matrices": len(mask),
                  "entries": count(mask)}


def prepare_model(cfg: FinetuneConfig, device: str, mask: dict | None):
    """Load the model for ``cfg.mode``; zero the masked weights first so training sees the pruned model."""
    kept, info = None, {}
    if cfg.mode == "qlora":
        model = _load_4bit(cfg)
    else:
        model = load_model(cfg.model, cfg.dtype, device).model
    info["model_hash"] = model_hash(model)  # once: the handle's model is changed by training
    if mask is not None and cfg.mode != "qlora":  # 4-bit weights cannot be indexed; NF4 keeps 0 exact
        kept = bind_mask(model, mask)
        info["mask_nonzero_at_start"] = kept.nonzero()
        if info["mask_nonzero_at_start"]:
            print(f"harmprune: note: {info['mask_nonzero_at_start']} masked weights were not 0 in {cfg.model}; "
                  "zeroing them before training", file=sys.stderr)
        kept.zero_weights_()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if not cfg.full:
            model.enable_input_require_grads()
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        info["target_modules"] = "all parameters"
    else:
        model, names = add_lora(model, cfg)
        info.update(target_modules=len(names), lora_scale=lora_scale(cfg))
    info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, kept, info


def make_optimizer(model, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    return opt, sched


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def resume_settings(cfg: FinetuneConfig, data_info: dict) -> dict:
    """What must match for a checkpoint to be resumed."""
    s = {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}
    return {**s, "data_sha256": data_info["sha256"], "records_sha256": data_info["records_sha256"]}


def last_checkpoint(out: str | Path) -> Path | None:
    """The newest complete ``DIR/checkpoints/step-N`` (its trainer_state.json is written last)."""
    root = Path(out) / CHECKPOINTS
    done = [d for d in root.glob("step-*") if d.name[5:].isdigit() and (d / STATE_FILE).is_file()]
    return max(done, key=lambda d: int(d.name[5:]), default=None)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, opt, sched, state: TrainState, settings: dict) -> Path:
    """Write ``step-N`` atomically (``manifest.atomic_dir``), then drop older checkpoints."""
    from safetensors.torch import save_file

    final = out / CHECKPOINTS / f"step-{state.step}"
    with manifest.atomic_dir(final, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        manifest.write_json(tmp / STATE_FILE, {"step": state.step, "losses": state.losses, "settings": settings})
    for old in final.parent.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, opt, sched, settings: dict) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG; refuse a checkpoint of different settings."""
    from safetensors.torch import load_file

    saved = manifest.read_json(path / STATE_FILE)
    for key in sorted(set(settings) | set(saved["settings"])):
        if saved["settings"].get(key) != settings.get(key):
            raise HarmpruneError(f"{path} was made with {key}={saved['settings'].get(key)!r}, this run has "
                                 f"{settings.get(key)!r}; resume with the same settings or use --overwrite")
    weights, params = load_file(str(path / "trainable.safetensors")), _trainable(model)
    if set(weights) != set(params):
        raise HarmpruneError(f"{path}: its trainable parameters do not match this model's")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(step=int(saved["step"]), losses=[float(x) for x in saved["losses"]])


def prepare_out(cfg: FinetuneConfig) -> Path | None:
    """Check DIR; return the checkpoint to resume from, or None to start afresh."""
    out = Path(cfg.out)
    validate.check_writable_dir(out)
    last = last_checkpoint(out)
    if cfg.resume and last is not None:
        return last
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not cfg.overwrite:
            hint = ("it holds checkpoints of an interrupted run: pass --resume to continue it or --overwrite to start "
                    "again") if (out / CHECKPOINTS).exists() else "pass --overwrite to replace it"
            raise HarmpruneError(f"{out} is not empty; {hint}")
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return None


# ---------------------------------------------------------------- the loop


def _before_step(step: int) -> None:
    """Called before each optimizer step (tests patch it to simulate an interruption)."""


def step_loss(model, items, micro_batches: list[list[int]], pad_id: int, device: str) -> float:
    """Forward+backward every micro-batch of one optimizer step; the loss is the step's mean token NLL."""
    batches = [collate([items[i] for i in mb], pad_id) for mb in micro_batches]
    ntok = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))
    total = 0.0
    for b in batches:
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        nll, _ = response_nll_sum(out.logits, b["labels"].to(device))
        (nll / ntok).backward()
        total += float(nll.detach())
    return total / ntok


def train(model, items, plan: Plan, cfg: FinetuneConfig, opt, sched, state: TrainState, kept: BoundMask | None,
          pad_id: int, device: str, settings: dict) -> TrainState:
    """Run optimizer steps ``state.step .. plan.total``; checkpoint every ``cfg.save_steps``."""
    from tqdm.auto import tqdm

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=plan.total, initial=state.step, desc=f"finetune ({cfg.mode})", unit="step")
    while state.step < plan.total:
        _before_step(state.step)
        loss = step_loss(model, items, plan.micro_batches(state.step), pad_id, device)
        if kept is not None:
            kept.zero_grads_()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if kept is not None and cfg.full:
            kept.zero_weights_()  # momentum and weight decay would move them otherwise
        state.step += 1
        state.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < plan.total:
            save_checkpoint(Path(cfg.out), model, opt, sched, state, settings)
    bar.close()
    model.eval()
    return state


# ---------------------------------------------------------------- outputs


def _merge(cfg: FinetuneConfig, adapter_dir: Path, mask: dict | None, device: str):
    """Reload the base unquantized, apply the saved adapter, merge and re-zero the mask."""
    from peft import PeftModel

    base, _ = load_model(cfg.model, cfg.dtype, "cpu" if cfg.mode == "qlora" else device)
    return masked_merge(PeftModel.from_pretrained(base, str(adapter_dir)), mask)


def save_outputs(cfg: FinetuneConfig, model, kept: BoundMask | None, mask: dict | None, report: dict,
                 device: str) -> Path:
    from ..pruning.checkpoint import MASK_FILE, original_tokenizer

    tok = original_tokenizer(cfg.model)
    with manifest.atomic_dir(cfg.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cfg.full and kept is not None:
            report["mask_nonzero_after"] = kept.nonzero()
            shutil.copyfile(report["keep_mask"]["path"], tmp / MASK_FILE)
        if cfg.merge:
            merged = _merge(cfg, tmp, mask, device)
            merged.save_pretrained(tmp / "merged")
            tok.save_pretrained(tmp / "merged")
            if mask is not None:
                report["mask_nonzero_after"] = bind_mask(merged, mask).nonzero()
                shutil.copyfile(report["keep_mask"]["path"], tmp / "merged" / MASK_FILE)
            report["outputs"]["merged"] = "merged"
        if mask is not None and not cfg.full and not cfg.merge:
            print("harmprune: warning: --keep-mask without --merge: the adapter alone does NOT keep the mask "
                  "(W + scale·BA refills pruned weights at inference); pass --merge for a masked checkpoint",
                  file=sys.stderr)
        manifest.write_json(tmp / CONFIG_FILE, report)
    return Path(cfg.out)


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.train_data`` and write ``cfg.out``; returns the output directory."""
    device = resolve_device(cfg.device)
    check_quantization(cfg, device)
    resume_from = prepare_out(cfg)
    tok = load_tokenizer(cfg.model)
    items, data_info = load_training_data(cfg, tok)
    plan = Plan(len(items), cfg.train_batch_size, cfg.grad_accum, cfg.epochs, cfg.seed, cfg.max_steps)
    check_plan(plan, cfg)  # before the model is loaded
    mask, mask_info = load_keep_mask(cfg)
    model, kept, model_info = prepare_model(cfg, device, mask)
    opt, sched = make_optimizer(model, cfg, plan.total)
    settings = resume_settings(cfg, data_info)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, opt, sched, settings)
    manifest.banner("finetune", {"model": cfg.model, "data": cfg.train_data, "mode": cfg.mode, "records": len(items),
                                 "steps": f"{plan.total} ({cfg.train_batch_size} x {cfg.grad_accum} per step)",
                                 "lr": cfg.lr, "keep_mask": cfg.keep_mask, "device": device, "out": cfg.out,
                                 "resume": f"from step {state.step}" if resume_from else "no"})
    with manifest.Stopwatch() as sw:
        state = train(model, items, plan, cfg, opt, sched, state, kept, tok.pad_token_id, device, settings)
    report = {"config": to_dict(cfg), "mode": cfg.mode, "device": device, "model": {"spec": cfg.model, **model_info},
              "data": data_info, "keep_mask": mask_info, "steps": state.step, "final_loss": state.losses[-1],
              "mean_loss": sum(state.losses) / len(state.losses), "losses": state.losses,
              "resumed_from": str(resume_from) if resume_from else None, "wall_seconds": sw.seconds,
              "peak_memory_bytes": manifest.Stopwatch.peak_memory_bytes(), "versions": manifest.versions(),
              "outputs": {"adapter" if not cfg.full else "checkpoint": "."}}
    return save_outputs(cfg, model, kept, mask, report, device)
