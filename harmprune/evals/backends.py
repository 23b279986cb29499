"""Generation backends behind one tiny protocol, with a registry (house style: lm-eval's ``LM``).

A backend turns context token ids into new token ids: ``backend.generate(contexts, cfg)`` returns
``cfg.n`` lists of ids per context, in the contexts' order, each cut before the first EOS id
(special tokens and padding never appear). Decoding, prompt building and prefill stay in
``generation``; a backend only samples.

- ``hf``: transformers ``generate`` on a loaded model (``generate_tokens`` below); a PEFT
  adapter is part of the loaded model (``core.models.load_model(adapter=...)``).
- ``vllm``: a vLLM engine built from the checkpoint path (a pruned checkpoint is a plain HF
  checkpoint; aliases resolve through ``core.models.resolve``), LoRA adapters served per call
  through ``LoRARequest``. Needs ``pip install 'harmprune[vllm]'`` and CUDA.
- ``auto``: ``vllm`` when usable, else ``hf`` with a one-line notice.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from ..core.errors import HarmpruneError, MissingDependency
from ..core.models import ModelHandle


class Backend(Protocol):
    name: str

    def generate(self, contexts: list[list[int]], cfg) -> list[list[list[int]]]:
        """``cfg.n`` new-token-id lists per context (EOS and after removed), in the contexts' order."""


@dataclass(frozen=True)
class BackendEntry:
    factory: Callable  # (model, tokenizer) -> Backend
    unavailable: Callable[[], str | None]  # None when usable, else why not (one line)


_REGISTRY: dict[str, BackendEntry] = {}
AUTO_ORDER = ("vllm", "hf")  # ``auto`` takes the first usable one


def register_backend(name: str, unavailable: Callable[[], str | None] = lambda: None):
    """Class decorator: register a backend factory under ``name``."""

    def wrap(factory):
        _REGISTRY[name] = BackendEntry(factory, unavailable)
        return factory

    return wrap


def backend_names() -> list[str]:
    return [*_REGISTRY, "auto"]


def resolve_backend(name: str, hf_only: str | None = None) -> str:
    """The concrete backend for ``name`` (``auto`` → first usable of vllm, hf, with a notice).

    ``hf_only``: why this run must generate with transformers (e.g. ``--load-in-4bit``): ``auto``
    then picks ``hf`` quietly and any other explicit choice is refused.
    """
    if name == "auto":
        if hf_only:
            return "hf"
        for cand in AUTO_ORDER:
            why = _REGISTRY[cand].unavailable()
            if why is None:
                return cand
            print(f"harmprune: {cand} backend unavailable ({why}); generating with transformers", file=sys.stderr)
        return "hf"
    if name not in _REGISTRY:
        raise HarmpruneError(f"unknown generation backend {name!r}; choose one of {', '.join(backend_names())}")
    if hf_only and name != "hf":
        raise HarmpruneError(f"--backend {name} cannot be combined with {hf_only}; use --backend hf")
    why = _REGISTRY[name].unavailable()
    if why is not None:
        raise MissingDependency(f"--backend {name}: {why}")
    return name


def make_backend(name: str, model, tokenizer) -> Backend:
    """A backend instance for a resolved ``name``. ``model``: a loaded HF model, or for backends that
    load the checkpoint themselves a ``core.models.ModelRef`` (or a loaded model naming its spec)."""
    return _REGISTRY[resolve_backend(name)].factory(model, tokenizer)


# ---------------------------------------------------------------- hf


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (may be a list);
    refuses a tokenizer without any (generation would never stop early)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        v = getattr(src, "eos_token_id", None)
        ids.update(v if isinstance(v, (list, tuple)) else ([v] if v is not None else []))
    if not ids:
        raise HarmpruneError("the tokenizer has no EOS token; generation would never stop early")
    return ids


def cut_at_eos(ids: list[int], stop: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j]
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def _hf_generate_batch(model, tokenizer, contexts: list[list[int]], cfg, stop: set[int]) -> list[list[list[int]]]:
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    ids, mask = _left_pad(contexts, pad, model.device)
    reps = 1 if cfg.greedy else cfg.n  # greedy completions are identical: generate once, copy
    gc = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, num_return_sequences=reps,
        # Unset fields would be filled from the checkpoint's generation_config (e.g. temperature 0.6,
        # top_k 50, repetition penalty), so every field that shapes the output is set explicitly.
        temperature=cfg.temperature if not cfg.greedy else 1.0, top_p=cfg.top_p if not cfg.greedy else 1.0,
        top_k=0 if not cfg.greedy else 50, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        pad_token_id=pad, eos_token_id=sorted(stop), use_cache=True,
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    new = out[:, ids.shape[1]:].tolist()
    per_prompt = [[cut_at_eos(new[i * reps + j], stop) for j in range(reps)] for i in range(len(contexts))]
    return [c * cfg.n if reps == 1 else c for c in per_prompt]


# Prompts per generation batch when ``--gen-batch-size`` is 0 (auto), by device type. A decode step
# reads every weight once whatever the batch, and each step pays a fixed Python/dispatch cost, so
# larger batches are faster until compute or memory runs out. CPU: bench/generation.py on the 2-core
# dev box (bench/README.md: 8 -> 16 -> 32 -> 64 kept getting faster, the same greedy replies at each;
# 32 = make prune's 32 prompts per set in one batch); CUDA: far from either limit at 64 for the
# models this project runs.
DEFAULT_BATCH = {"cpu": 32, "cuda": 64}


def default_batch_size(device) -> int:
    """The generation batch of ``--gen-batch-size 0`` on ``device`` (a torch.device or a string)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return DEFAULT_BATCH.get(kind, DEFAULT_BATCH["cpu"])


def batch_size_for(cfg, device) -> int:
    """``cfg.gen_batch_size``, or the device's default when it is 0 (auto)."""
    return cfg.gen_batch_size or default_batch_size(device)


def generate_tokens(model, tokenizer, contexts: list[list[int]], cfg, desc: str = "generate") -> list[list[list[int]]]:
    """New token ids (EOS and after removed), ``cfg.n`` lists per context, in the contexts' order.

    Contexts are sorted longest first so each batch pads little (and memory errors show at once);
    the order is restored at the end. ``cfg.gen_batch_size`` 0 = the device's default
    (:func:`default_batch_size`). Greedy replies do not depend on the batch (tests/test_generation.py).
    """
    stop = eos_ids(model, tokenizer)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    results: list = [None] * len(contexts)
    dev = model.device
    bs = batch_size_for(cfg, dev)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        with tqdm(total=len(contexts), desc=desc, unit="prompt", file=sys.stderr) as bar:
            for b in range(0, len(order), bs):
                idx = order[b : b + bs]
                outs = _hf_generate_batch(model, tokenizer, [contexts[i] for i in idx], cfg, stop)
                for i, o in zip(idx, outs):
                    results[i] = o
                bar.update(len(idx))
    return results


@register_backend("hf")
class HFBackend:
    name = "hf"

    def __init__(self, model, tokenizer):
        if not isinstance(model, torch.nn.Module):
            raise HarmpruneError("the hf backend needs a loaded model (got a model reference)")
        self.model, self.tokenizer = model, tokenizer

    def generate(self, contexts, cfg):
        return generate_tokens(self.model, self.tokenizer, contexts, cfg)


# ---------------------------------------------------------------- vllm


def _vllm_unavailable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'harmprune[vllm]')"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


# vLLM accepts only these LoRA ranks as max_lora_rank; an adapter's rank is rounded up to one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter: str) -> int:
    """The largest LoRA rank in an adapter (``r`` and any ``rank_pattern`` override)."""
    from ..core.models import read_adapter_config

    cfg = read_adapter_config(adapter)
    return max([int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])


def vllm_max_lora_rank(rank: int) -> int:
    for r in VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise HarmpruneError(f"LoRA rank {rank} exceeds vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


_ENGINE: dict = {}  # one engine per process: a second one would not fit next to the first on the GPU
_LORA_IDS: dict[str, int] = {}


def _engine(key: tuple, kwargs: dict):
    from vllm import LLM

    if _ENGINE.get("key") != key:
        if _ENGINE:  # free the previous model first (e.g. em-experiment evaluates six in one process)
            _ENGINE.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _ENGINE.update(key=key, llm=LLM(**kwargs))
    return _ENGINE["llm"]


@register_backend("vllm", unavailable=_vllm_unavailable)
class VLLMBackend:
    """vLLM on the checkpoint ``model`` names, with its LoRA adapter if any: ``model`` is a
    ``core.models.ModelRef`` or ``ModelHandle`` (``spec``, ``adapter``, ``quantize``), or a bare
    Hugging Face model (its ``name_or_path``, no adapter).

    The engine is built once per (checkpoint, dtype, LoRA rank) and process; contexts go in as
    ``prompt_token_ids`` so prompts are tokenized exactly as for the hf backend.
    """

    name = "vllm"

    def __init__(self, model, tokenizer):
        from ..core.models import parse_dtype, resolve

        if getattr(model, "quantize", None):
            raise HarmpruneError("the vllm backend loads the checkpoint itself and cannot use --load-in-8bit/"
                                 "--load-in-4bit; use --backend hf, or give vLLM a pre-quantized checkpoint")
        self.spec = getattr(model, "spec", None) or getattr(model, "name_or_path", None)
        if not self.spec:
            raise HarmpruneError("the vllm backend needs the model's checkpoint path (load it with load_model)")
        self.adapter = getattr(model, "adapter", None)
        model = getattr(model, "model", model) if isinstance(model, ModelHandle) else model
        self.stop = eos_ids(model, tokenizer)
        path, gguf = resolve(self.spec)
        dtype = getattr(model, "dtype", None) or "auto"
        dtype = parse_dtype(dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        dtype = str(dtype).removeprefix("torch.")
        # An HF model already on the GPU (e.g. the utility eval) leaves less room for vLLM's cache.
        shares_gpu = isinstance(model, torch.nn.Module) and any(p.is_cuda for p in model.parameters())
        kwargs = {"model": f"{path}/{gguf}" if gguf else path, "tokenizer": path, "dtype": dtype,
                  "gpu_memory_utilization": 0.5 if shares_gpu else 0.85}
        self.lora_rank = None
        if self.adapter:
            self.lora_rank = vllm_max_lora_rank(adapter_rank(self.adapter))
            kwargs.update(enable_lora=True, max_lora_rank=self.lora_rank, max_loras=1)
        self.engine_kwargs = kwargs
        self.key = (kwargs["model"], dtype, self.lora_rank)

    def lora_request(self):
        if not self.adapter:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(self.adapter).expanduser().resolve())
        lora_id = _LORA_IDS.setdefault(path, len(_LORA_IDS) + 1)  # vLLM ids are positive and stable per adapter
        return LoRARequest(Path(path).name or "adapter", lora_id, path)

    def sampling_params(self, cfg):
        from vllm import SamplingParams

        greedy = cfg.temperature == 0
        # Greedy completions are identical: ask for one and copy it, as the hf backend does.
        return SamplingParams(n=1 if greedy else cfg.n, temperature=cfg.temperature,
                              top_p=1.0 if greedy else cfg.top_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed,
                              stop_token_ids=sorted(self.stop), repetition_penalty=1.0)

    def generate(self, contexts, cfg):
        llm = _engine(self.key, {**self.engine_kwargs, "seed": cfg.seed})
        sp = self.sampling_params(cfg)
        outs = llm.generate([{"prompt_token_ids": list(c)} for c in contexts], sp,
                            lora_request=self.lora_request())
        result = []
        for r in outs:
            ids = [cut_at_eos(list(o.token_ids), self.stop) for o in r.outputs]
            result.append(ids * cfg.n if len(ids) == 1 and cfg.n > 1 else ids)
        return result
