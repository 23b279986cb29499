"""``harmprune plan``: peak memory and passes of every stage, estimated from the model config alone.

Nothing is loaded but ``config.json``: the parameters are counted on a ``meta``-device instance of
the architecture (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``), so any
architecture transformers knows works, and the scored weights are the ones ``select_linears``
picks with the same ``--targets``/``--ignore`` as ``harmprune score``.

Memory model (bytes; ``b`` = bytes per element of ``--dtype``, ``N`` = batch × max_length tokens):

- ``baseline``   framework resident memory: Python + torch + transformers + tokenizer + data
                 (CPU: process RSS measured by ``bench/memory.py``; CUDA: 0, the count is
                 ``torch.cuda.max_memory_allocated``, which leaves out the ~0.5 GiB CUDA context).
- ``weights``    unique parameters × b (tied weights once).
- ``accumulators`` (score) one float32 tensor per scored weight: snip/snip-abs Σ numel × 4,
                 wanda Σ in_features × 4. The stored scores reuse them (``score_dtype`` float32) or
                 are a converted copy written out one matrix at a time.
- ``scratch``    snip-abs: one float32 (out, in) buffer per distinct scored-weight shape.
- ``activations`` tensors autograd keeps for backward: ``ACT_FACTOR`` × N × Σ_scored (in + out) × b
                 (a linear's input and output per token stand for the block's saved tensors; the
                 count needs no knowledge of the block layout), plus, for eager attention,
                 layers × batch × heads × L² × b. With gradient checkpointing only block inputs
                 (layers × N × hidden × b) plus one block's activations are kept. Forward-only
                 stages (wanda, eval) keep one block's activations.
- ``logits``     batch × L × vocab: ``LOGIT_COPIES`` float32 copies at the peak (the log-softmax,
                 the gather's gradient and the logits' gradient in backward), plus one b-sized copy
                 when the model is not float32 (the logits before ``.float()``). wanda skips the head
                 (``logits_to_keep=1``).
- ``load``       (CPU) loading a safetensors checkpoint briefly holds the mapped file next to the
                 parameters: peak ≥ baseline + ``LOAD_COPIES`` × weights.

Stage peak = baseline + max(load, sum of the stage's terms). Prune: weights + harm and benign score
files (score dtype) + three bool masks + float32 temporaries for the largest matrix. Eval/generate:
weights + KV cache (2 × layers × kv_heads × head_dim × batch × (prompt + new tokens) × b) + one
block's forward + the vocabulary logits of the prompt batch. Finetune: LoRA adds r × (in + out) per
target as float32 parameter + grad + two AdamW moments; full fine-tuning adds a grad (b) and two
float32 moments per parameter; activations and logits as scoring at the finetune batch.

Passes: score = ceil(nsamples / batch) forward (+ as many backward for snip/snip-abs, + as many
recomputing forwards with checkpointing); generate = ceil(prompts / batch) prefills + as many
× (max_new_tokens - 1) one-token decode steps; finetune = micro-batches (forward + backward) and
ceil(micro-batches / grad_accum) optimizer steps.

The constants are calibrated on CPU float32 runs (``bench/memory.py``, table in bench/README.md);
the estimate is meant to be within 25% of the measured peak, not exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..attribution.formulas import METHODS
from ..core.errors import HarmpruneError
from ..core.models import parse_dtype, resolve_device
from ..core.options import GenBatchOptions, LoraOptions, ModelOptions, NewTokensOptions, ScoringOptions, TrainOptions
from ..core.settings import check, check_min, opt

GiB = 1024 ** 3
# Calibrated against bench/memory.py (CPU, float32, torch 2.13, transformers 5.23): an import-only
# process (torch, transformers, harmprune, tokenizer, data) holds 0.42 GiB.
BASELINE_CPU = int(0.42 * GiB)
ACT_FACTOR = 1.35
LOGIT_COPIES = 3
LOAD_COPIES = 2.0


@dataclass
class ModelShape:
    """What the estimates need to know about an architecture (all counts, no tensors)."""

    name: str
    params: int                     # unique parameters (tied ones once)
    scored: int                     # Σ numel of the scored linear weights
    scored_in: int                  # Σ in_features of the scored linears (wanda's accumulators)
    scored_io: int                  # Σ (in_features + out_features) of the scored linears
    scratch: int                    # Σ numel over distinct scored-weight shapes (snip-abs buffers)
    largest: int                    # numel of the largest scored weight
    n_scored: int                   # number of scored linears
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    eager_attention: bool


def shape_of(model: torch.nn.Module, config, name: str = "", targets=None, ignore=None) -> ModelShape:
    """Count a (meta or real) model's parameters and scored linears; no memory is touched."""
    from ..core.targets import select_linears

    linears = select_linears(model, targets, ignore)
    shapes = {tuple(m.weight.shape) for m in linears.values()}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    out_emb = model.get_output_embeddings()
    vocab = out_emb.weight.shape[0] if out_emb is not None else model.get_input_embeddings().weight.shape[0]
    return ModelShape(
        name=name, params=sum(p.numel() for p in model.parameters()),
        scored=sum(m.weight.numel() for m in linears.values()),
        scored_in=sum(m.in_features for m in linears.values()),
        scored_io=sum(m.in_features + m.out_features for m in linears.values()),
        scratch=sum(math.prod(s) for s in shapes), largest=max((m.weight.numel() for m in linears.values()), default=0),
        n_scored=len(linears), layers=int(getattr(text, "num_hidden_layers", 1) or 1), hidden=hidden, vocab=vocab,
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        eager_attention=attn == "eager")


def load_shape(spec: str, targets=None, ignore=None) -> ModelShape:
    """Read the config of a Hub id / checkpoint dir / .gguf / alias and count it on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.models import resolve

    path, gguf = resolve(spec)
    try:
        cfg = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError) as e:
        raise HarmpruneError(f"cannot read the config of model {spec!r}: {str(e).splitlines()[0]}") from None
    return shape_of(model, cfg, spec, targets, ignore)


@dataclass(kw_only=True)
class PlanConfig(ModelOptions, ScoringOptions, GenBatchOptions, NewTokensOptions, TrainOptions, LoraOptions):
    """Settings of ``harmprune plan`` (each field is also a CLI option). ``--device`` picks the memory
    model: cpu (process RSS, framework baseline included) or cuda (max allocated); ``--nsamples`` also
    counts the prompts generated and the records fine-tuned."""

    methods: list[str] = opt(list(METHODS), help="score methods to plan", deprecated=("--method",))
    prompt_length: int = opt(128, help="prompt tokens per generation", range=">= 1")
    json: bool = opt(False, help="print JSON instead of a table")

    def __post_init__(self):
        self.device = resolve_device(self.device)
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad, f"unknown method {bad[0] if bad else ''!r}; choose from {', '.join(METHODS)}")
        check_min(self, 1, "nsamples", "batch_size", "max_length", "prompt_length", "max_new_tokens",
                  "train_batch_size", "grad_accum", "train_max_length", "lora_r")
        check_min(self, 0, "gen_batch_size")
        check(self.device.split(":")[0] in ("cpu", "cuda"), f"--device must be cpu or cuda, got {self.device!r}")
        parse_dtype(self.dtype)
        parse_dtype(self.score_dtype)

    @property
    def on_cpu(self) -> bool:
        return self.device.startswith("cpu")


@dataclass
class StageEstimate:
    """One stage's estimated peak (bytes, by component) and passes."""

    stage: str
    parts: dict[str, int]
    passes: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def peak(self) -> int:
        run = sum(v for k, v in self.parts.items() if k not in ("baseline", "load"))
        return self.parts.get("baseline", 0) + max(run, self.parts.get("load", 0))

    def to_dict(self) -> dict:
        return {"stage": self.stage, "peak_bytes": self.peak, "peak_gib": round(self.peak / GiB, 3),
                "parts": self.parts, "passes": self.passes, "note": self.note}


def _nbytes(dtype: str) -> int:
    return torch.empty((), dtype=parse_dtype(dtype)).element_size()


def _common(s: ModelShape, cfg: PlanConfig) -> dict[str, int]:
    b = _nbytes(cfg.dtype)
    return {"baseline": BASELINE_CPU if cfg.on_cpu else 0,
            "load": int(LOAD_COPIES * s.params * b) if cfg.on_cpu else 0,
            "weights": s.params * b}


def activation_bytes(s: ModelShape, batch: int, length: int, dtype: str, checkpointing: bool = False,
                     backward: bool = True) -> int:
    """Tensors kept for backward over a batch × length batch (forward-only: one block's worth)."""
    b = _nbytes(dtype)
    tokens = batch * length
    all_blocks = ACT_FACTOR * tokens * s.scored_io * b
    attn = s.layers * batch * s.heads * length * length * b if s.eager_attention else 0
    one_block = (all_blocks + attn) / s.layers
    if not backward:
        return int(one_block)
    if checkpointing:
        return int(s.layers * tokens * s.hidden * b + one_block)
    return int(all_blocks + attn)


def logit_bytes(s: ModelShape, batch: int, length: int, dtype: str) -> int:
    """The vocabulary-sized tensors at the loss: logits (model dtype) + float32 copies."""
    n, b = batch * length * s.vocab, _nbytes(dtype)
    return n * (4 * LOGIT_COPIES + (b if b != 4 else 0))  # forward-only (eval NLL) holds as many


def estimate_score(s: ModelShape, cfg: PlanConfig, method: str) -> StageEstimate:
    parts = _common(s, cfg)
    grad = method != "wanda"
    parts["accumulators"] = 4 * (s.scored if grad else s.scored_in)
    parts["scratch"] = 4 * s.scratch if method == "snip-abs" else 0
    parts["activations"] = activation_bytes(s, cfg.batch_size, cfg.max_length, cfg.dtype,
                                            cfg.gradient_checkpointing, backward=grad)
    parts["logits"] = logit_bytes(s, cfg.batch_size, cfg.max_length, cfg.dtype) if grad else 0
    batches = math.ceil(cfg.nsamples / cfg.batch_size)
    fwd = batches * (2 if grad and cfg.gradient_checkpointing else 1)
    return StageEstimate(f"score {method}", parts, {"forward": fwd, "backward": batches if grad else 0},
                         f"score file {score_file_bytes(s, cfg.score_dtype) / GiB:.2f} GiB")


def score_file_bytes(s: ModelShape, score_dtype: str) -> int:
    return s.scored * _nbytes(score_dtype)


def estimate_prune(s: ModelShape, cfg: PlanConfig) -> StageEstimate:
    parts = _common(s, cfg)
    # harm + benign files are read one matrix at a time (attribution.artifact.LazyTensors)
    parts["scores"] = 2 * s.largest * _nbytes(cfg.score_dtype)
    parts["masks"] = 3 * s.scored  # bool: Top_q(harm), Top_p(benign), the difference
    parts["scratch"] = 3 * 4 * s.largest  # float32 importance + top-k temporaries of one matrix
    return StageEstimate("prune", parts, {"forward": 0, "backward": 0})


def estimate_generate(s: ModelShape, cfg: PlanConfig) -> StageEstimate:
    parts = _common(s, cfg)
    from ..evals.backends import default_batch_size

    b, B = _nbytes(cfg.dtype), cfg.gen_batch_size or default_batch_size(cfg.device)
    total = cfg.prompt_length + cfg.max_new_tokens
    parts["kv_cache"] = 2 * s.layers * s.kv_heads * s.head_dim * B * total * b
    parts["activations"] = activation_bytes(s, B, cfg.prompt_length, cfg.dtype, backward=False)
    parts["logits"] = B * s.vocab * 4 * 2  # last-position logits + the float32 processed scores
    prefills = math.ceil(cfg.nsamples / B)
    return StageEstimate("eval/generate", parts,
                         {"forward": prefills * cfg.max_new_tokens, "backward": 0},
                         f"{prefills} prefills + {prefills * (cfg.max_new_tokens - 1)} decode steps")


def estimate_finetune(s: ModelShape, cfg: PlanConfig, full: bool) -> StageEstimate:
    parts = _common(s, cfg)
    b = _nbytes(cfg.dtype)
    if full:
        parts["grads+adam"] = s.params * (b + 8)
    else:
        lora = cfg.lora_r * s.scored_io
        parts["grads+adam"] = lora * 4 * 4  # float32 adapter weights, grads, two AdamW moments
    parts["activations"] = activation_bytes(s, cfg.train_batch_size, cfg.train_max_length, cfg.dtype,
                                            cfg.gradient_checkpointing)
    parts["logits"] = logit_bytes(s, cfg.train_batch_size, cfg.train_max_length, cfg.dtype)
    micro = math.ceil(cfg.nsamples / cfg.train_batch_size)
    fwd = micro * (2 if cfg.gradient_checkpointing else 1)
    return StageEstimate(f"finetune {'full' if full else 'lora'}", parts,
                         {"forward": fwd, "backward": micro, "optimizer_steps": math.ceil(micro / cfg.grad_accum)})


def estimate_all(s: ModelShape, cfg: PlanConfig) -> list[StageEstimate]:
    """Every stage's estimate, in pipeline order (pure: no I/O)."""
    return ([estimate_score(s, cfg, m) for m in cfg.methods]
            + [estimate_prune(s, cfg), estimate_generate(s, cfg),
               estimate_finetune(s, cfg, full=False), estimate_finetune(s, cfg, full=True)])


COLUMNS = ("baseline", "weights", "accumulators", "scratch", "activations", "logits", "scores", "masks",
           "kv_cache", "grads+adam")


def format_table(s: ModelShape, cfg: PlanConfig, stages: list[StageEstimate]) -> str:
    """A plain-text table: peak and components in GiB, passes."""
    cols = [c for c in COLUMNS if any(st.parts.get(c) for st in stages)]
    head = ["stage", "peak GiB", *cols, "fwd", "bwd", "note"]
    rows = [[st.stage, f"{st.peak / GiB:.2f}", *(f"{st.parts.get(c, 0) / GiB:.2f}" for c in cols),
             str(st.passes.get("forward", 0)), str(st.passes.get("backward", 0)), st.note] for st in stages]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i in (0, len(head) - 1) else v.rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    title = (f"{s.name}: {s.params / 1e6:.1f}M parameters, {s.scored / 1e6:.1f}M scored in {s.n_scored} linears, "
             f"{s.layers} layers, vocab {s.vocab}; dtype {cfg.dtype}, device {cfg.device}, "
             f"score batch {cfg.batch_size} x {cfg.max_length}, {cfg.nsamples} samples"
             + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    note = ("peak = baseline + max(load, other parts); CPU: process RSS (load = the checkpoint mapped next to "
            "the weights, " f"{LOAD_COPIES:g} x weights); CUDA: max allocated, CUDA context not included")
    return "\n".join([title, fmt(head), *(fmt(r) for r in rows), note])


def plan(cfg: PlanConfig) -> dict:
    """Run the stage: read the config, estimate, print; return the JSON-ready result."""
    s = load_shape(cfg.model, cfg.targets or None, cfg.ignore or None)
    stages = estimate_all(s, cfg)
    result = {"model": asdict(s), "settings": asdict(cfg), "stages": [st.to_dict() for st in stages],
              "constants": {"baseline_cpu": BASELINE_CPU, "act_factor": ACT_FACTOR,
                            "logit_copies": LOGIT_COPIES, "load_copies": LOAD_COPIES}}
    print(json.dumps(result, indent=2) if cfg.json else format_table(s, cfg, stages))
    return result
