"""Generation engine: batched, left-padded, KV-cached, greedy by default; optional prefill attack.

Contract: ``generate(model, tok, prompts, cfg)`` returns ``n`` completions per prompt, in the
prompts' order. Greedy (``temperature == 0``) output does not depend on the batch size: batching
is an optimisation only. Sampling is reproducible for a given (seed, prompts, batch_size) and does
not touch the caller's global RNG. A completion stops at the first end-of-sequence token; special
tokens and padding are stripped.

Backends (``cfg.backend``: hf, vllm, auto) sit behind the protocol in :mod:`.backends`; ``model`` is
a loaded HF model, or a ``core.models.ModelRef`` when the backend loads the checkpoint itself.

Prefill attack (``cfg.prefill = K``): the first K tokens of a reference reply (usually a harmful
completion) are appended after the generation prompt and the model continues from there. The
returned completion *includes* that forced text, so judges see the whole reply;
:func:`prefill_prefixes` gives the forced text alone for the record.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.errors import HarmpruneError
from ..core.formatting import prompt_text, resolve_format
from ..core.settings import check, opt
from . import backends as B

BACKENDS = tuple(B.backend_names())  # hf, vllm, auto


@dataclass
class GenConfig:
    max_new_tokens: int = opt(256, help="most new tokens per completion (the prefill counts separately)")
    temperature: float = opt(0.0, help="sampling temperature; 0 = greedy")
    top_p: float = opt(1.0, help="nucleus sampling mass (used only when temperature > 0)")
    n: int = opt(1, help="completions per prompt")
    batch_size: int = opt(8, help="prompts per generation batch")
    seed: int = opt(0, help="sampling seed")
    prefill: int = opt(0, help="force the first K tokens of the reference response as the start of the reply")
    format: str = opt("auto", help="prompt format", choices=["auto", "chat", "raw"])
    backend: str = opt("hf", help="hf (transformers), vllm (needs vllm and CUDA), auto (vllm when usable)",
                       choices=list(BACKENDS))

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        check(self.temperature >= 0, "--temperature must be >= 0")
        check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        check(self.n >= 1, "--n must be >= 1")
        check(self.batch_size >= 1, "--batch-size must be >= 1")
        check(self.prefill >= 0, "--prefill must be >= 0")
        check(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------- inputs


def _context_text(tokenizer, prompt: str, fmt: str, system: str | None) -> str:
    if not system:
        return prompt_text(tokenizer, prompt, fmt)
    if fmt == "chat":
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return system + "\n\n" + prompt_text(tokenizer, prompt, fmt)


def prefill_ids(tokenizer, reference: str, k: int) -> list[int]:
    """The first ``k`` tokens of ``reference`` as the model would write them in its reply."""
    return tokenizer(reference, add_special_tokens=False)["input_ids"][:k] if k else []


def prefill_prefixes(tokenizer, references: list[str], k: int) -> list[str]:
    """The forced reply openings (text of the first ``k`` tokens of each reference)."""
    return [tokenizer.decode(prefill_ids(tokenizer, r, k), skip_special_tokens=True) for r in references]


def build_inputs(tokenizer, prompts: list[str], fmt: str, prefill_texts: list[str] | None = None,
                 k: int = 0, system: list | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt: (context token ids incl. forced prefill, the forced prefill ids alone)."""
    if k and prefill_texts is None:
        raise HarmpruneError("--prefill needs reference responses (prompts with a response field)")
    if prefill_texts is not None and len(prefill_texts) != len(prompts):
        raise HarmpruneError(f"{len(prefill_texts)} prefill texts for {len(prompts)} prompts")
    if system is not None and len(system) != len(prompts):
        raise HarmpruneError(f"{len(system)} system prompts for {len(prompts)} prompts")
    contexts, forced = [], []
    for i, p in enumerate(prompts):
        text = _context_text(tokenizer, p, fmt, system[i] if system else None)
        # A chat template writes its own special tokens; raw text gets the tokenizer's usual BOS.
        ids = tokenizer(text, add_special_tokens=(fmt == "raw"))["input_ids"]
        pre = prefill_ids(tokenizer, prefill_texts[i], k) if k else []
        contexts.append(ids + pre)
        forced.append(pre)
    return contexts, forced


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (may be a list)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        v = getattr(src, "eos_token_id", None)
        ids.update(v if isinstance(v, (list, tuple)) else ([v] if v is not None else []))
    return ids


def cut_at_eos(ids: list[int], stop: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j]
    return ids


# ---------------------------------------------------------------- HF backend


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def _hf_generate_batch(model, tokenizer, contexts: list[list[int]], cfg: GenConfig, stop: set[int]) -> list[list[list[int]]]:
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


def generate_tokens(model, tokenizer, contexts: list[list[int]], cfg: GenConfig, desc: str = "generate") -> list[list[list[int]]]:
    """New token ids (EOS and after removed), ``cfg.n`` lists per context, in the contexts' order.

    Contexts are sorted longest first so each batch pads little (and memory errors show at once);
    the order is restored at the end.
    """
    stop = eos_ids(model, tokenizer)
    if not stop:
        raise HarmpruneError("the tokenizer has no EOS token; generation would never stop early")
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    results: list = [None] * len(contexts)
    dev = model.device
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        with tqdm(total=len(contexts), desc=desc, unit="prompt", file=sys.stderr) as bar:
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                outs = _hf_generate_batch(model, tokenizer, [contexts[i] for i in idx], cfg, stop)
                for i, o in zip(idx, outs):
                    results[i] = o
                bar.update(len(idx))
    return results


# ---------------------------------------------------------------- API


def generate(model, tokenizer, prompts: list[str], cfg: GenConfig, prefill_texts: list[str] | None = None,
             system: list | None = None) -> list[list[str]]:
    """``cfg.n`` completions per prompt (forced prefill text included), in the prompts' order.

    ``prefill_texts[i]``: reference reply for prompt i (needed when ``cfg.prefill > 0``).
    ``system[i]``: optional system prompt for prompt i (None entries allowed).
    """
    fmt = resolve_format(tokenizer, cfg.format)
    contexts, forced = build_inputs(tokenizer, prompts, fmt, prefill_texts, cfg.prefill, system)
    new = B.make_backend(cfg.backend, model, tokenizer).generate(contexts, cfg)
    return [[tokenizer.decode(f + c, skip_special_tokens=True) for c in cs] for f, cs in zip(forced, new)]
