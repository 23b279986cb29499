"""The attribution loop: one forward (and for gradient methods one backward) per batch, all layers.

``attribute`` works on collated batches; ``compute_scores`` starts from records and is the API
other stages use without touching files. Contract and score direction: see ``formulas``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Iterable, Iterator

import torch
from torch import nn

from ..core import formatting
from ..core.errors import HarmpruneError
from ..core.manifest import Stopwatch
from ..core.targets import select_linears
from . import formulas
from .hooks import BatchState, LayerCapture, embedding_requires_grad_hook

WANDA_TOKENS = ("response", "all")
Scores = dict[str, torch.Tensor]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(training)


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _forward_kwargs(model: nn.Module, method: str) -> dict:
    # wanda needs no logits: skip the (vocab-sized) head where the model allows it.
    if method == "wanda" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def _check_losses(losses: torch.Tensor, batch_no: int, record_ids: list[int]) -> None:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise HarmpruneError(f"loss is {losses[b].item()} for record {record_ids[b]} (batch {batch_no}, "
                             f"sample {b}): the model or data produce non-finite values")


def attribute(model: nn.Module, batches: Iterable[tuple[dict, list[int]]], method: str,
              linears: dict[str, nn.Linear], *, wanda_tokens: str = "response", progress: bool = True,
              total: int | None = None, score_dtype: torch.dtype = torch.float32) -> tuple[Scores, dict]:
    """Score every linear in ``linears`` over ``batches`` of ``(collated batch, record indices)``.

    Returns ``({"<module>.weight": score}, stats)``; scores are CPU tensors of ``score_dtype`` with
    the weight's shape. Exactly one forward per batch, plus one backward for snip/snip-abs.
    """
    from tqdm.auto import tqdm

    if method not in formulas.METHODS:
        raise HarmpruneError(f"unknown method {method!r}; choose one of {', '.join(formulas.METHODS)}")
    if wanda_tokens not in WANDA_TOKENS:
        raise HarmpruneError(f"unknown wanda_tokens {wanda_tokens!r}; choose response or all")
    state = BatchState()
    caps = {name: LayerCapture(name, mod, method, state) for name, mod in linears.items()}
    device = _input_device(model)
    fwd_kw = _forward_kwargs(model, method)
    grad = method != "wanda"
    nll_sum, n_samples, n_batches = 0.0, 0, 0
    handles = [m.register_forward_hook(c.forward_hook) for c, m in ((c, c.module) for c in caps.values())]
    if grad:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_requires_grad_hook))
    t0 = time.perf_counter()
    try:
        with _frozen(model), torch.set_grad_enabled(grad):
            for batch_no, (batch, ids) in enumerate(tqdm(batches, total=total, desc=f"score {method}",
                                                          unit="batch", disable=not progress)):
                ids_t = batch["input_ids"].to(device)
                attn = batch["attention_mask"].to(device)
                labels = batch["labels"].to(device)
                if method == "wanda" and wanda_tokens == "response":
                    state.set(labels != formatting.IGNORE)
                else:
                    state.set(attn)
                out = model(input_ids=ids_t, attention_mask=attn, use_cache=False, **fwd_kw)
                if grad:
                    losses = formatting.per_sample_nll(out.logits, labels)
                    del out
                    _check_losses(losses.detach(), batch_no, ids)
                    losses.sum().backward()
                    nll_sum += float(losses.detach().sum())
                n_samples += len(ids)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        state.release()
    scores = {}
    for name, c in caps.items():
        s = formulas.finalize(method, c.module.weight, c.acc, inplace=True)
        c.acc = None
        if not torch.isfinite(s.sum()):  # one reduction: any NaN/inf entry makes the sum non-finite
            raise HarmpruneError(f"{method} scores of {name}.weight are not finite (NaN/inf weights or activations)")
        scores[f"{name}.weight"] = s.to(dtype=score_dtype, device="cpu").contiguous()
    stats = {
        "samples": n_samples,
        "batches": n_batches,
        "mean_nll": nll_sum / n_samples if grad and n_samples else None,
        "layers": len(caps),
        "layers_never_run": [n for n, c in caps.items() if c.calls == 0],
        "engine_seconds": round(time.perf_counter() - t0, 3),
        "peak_memory_bytes": Stopwatch.peak_memory_bytes(),
    }
    return scores, stats


def compute_scores(model: nn.Module, tokenizer, records, method: str, *, fmt: str | None = "auto",
                   max_length: int = 256, batch_size: int = 4, targets: list[str] | None = None,
                   ignore: list[str] | None = None, wanda_tokens: str = "response",
                   score_dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Scores, dict]:
    """Scores of ``method`` for ``records`` (a list of ``core.data.Record``), no files involved.

    Records are encoded with DESIGN.md's formatting (response-only loss), sorted by length so
    batches carry little padding (scores are sums, order does not matter), and right-padded.
    Returns ``({"<module>.weight": float scores}, stats)``; stats adds ``skipped`` (records with
    no response token left after truncation), ``tokens`` (response tokens), ``format``.
    """
    if batch_size < 1:
        raise HarmpruneError("batch_size must be at least 1")
    fmt = formatting.resolve_format(tokenizer, fmt)
    enc = formatting.encode(list(records), tokenizer, fmt, max_length)
    if not enc.items:
        raise HarmpruneError(f"no record has a response token within max_length={max_length}")
    linears = select_linears(model, targets, ignore)
    items = sorted(enc.items, key=lambda e: len(e.input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen():
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            yield formatting.collate(chunk, pad), [e.index for e in chunk]

    scores, stats = attribute(model, gen(), method, linears, wanda_tokens=wanda_tokens, progress=progress,
                              total=math.ceil(len(items) / batch_size), score_dtype=score_dtype)
    stats.update(skipped=enc.skipped, tokens=enc.tokens,
                 input_tokens=sum(len(e.input_ids) for e in items), format=fmt)
    return scores, stats
