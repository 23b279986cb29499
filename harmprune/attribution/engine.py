"""The attribution loop: one forward (and for gradient methods one backward) per batch, all layers.

``attribute`` works on collated batches; ``compute_scores`` starts from records and is the API
other stages use without touching files. Contract and score direction: see ``formulas``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..core import formatting
from ..core.errors import HarmpruneError
from ..core.manifest import Stopwatch
from ..core.targets import select_linears
from . import formulas
from .hooks import BatchState, LayerCapture, compute_device, embedding_requires_grad_hook, real_weight

WANDA_TOKENS = ("response", "all")
Scores = dict[str, torch.Tensor]
# reduce(accumulators by module name, {count: value}) -> counts: combines the raw sums of several
# processes before ``formulas.finalize`` (see ``distributed.all_reduce_run``); it may edit accumulators in place.
Reducer = Callable[[dict[str, torch.Tensor], dict[str, float]], dict[str, float]]


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


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Activation checkpointing through transformers' public switch, for this run only.

    Non-reentrant checkpointing: the hooks take X and δ in the real forward and ignore the
    recomputation (see ``hooks``). transformers checkpoints a block only in training mode, so the
    checkpointed blocks alone are flagged as training (dropout modules stay in eval mode).
    """
    if not enabled:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise HarmpruneError(f"{type(model).__name__} does not support gradient checkpointing")
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    was_on = bool(getattr(model, flag, False))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable({"use_reentrant": False})  # also replaces a caller's reentrant setting, which the hooks cannot use
    blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in blocks:
        m.training = True
    try:
        yield
    finally:
        for m in blocks:
            m.training = False
        if not was_on:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if getattr(model, "_require_grads_hook", None) is not None:  # set by the enable call
                model.disable_input_require_grads()


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
              total: int | None = None, score_dtype: torch.dtype = torch.float32,
              gradient_checkpointing: bool = False, reduce: Reducer | None = None) -> tuple[Scores, dict]:
    """Score every linear in ``linears`` over ``batches`` of ``(collated batch, record indices)``.

    Returns ``({"<module>.weight": score}, stats)``; scores are CPU tensors of ``score_dtype`` with
    the weight's shape. Exactly one forward per batch, plus one backward for snip/snip-abs (with
    ``gradient_checkpointing`` the backward recomputes each block's forward; results are the same).
    ``reduce``, when given, combines the raw sums with other processes' once, before finalizing:
    every method's statistic is a sum over samples, so scoring disjoint shards and summing is exact.
    """
    from tqdm.auto import tqdm

    if method not in formulas.METHODS:
        raise HarmpruneError(f"unknown method {method!r}; choose one of {', '.join(formulas.METHODS)}")
    if wanda_tokens not in WANDA_TOKENS:
        raise HarmpruneError(f"unknown wanda_tokens {wanda_tokens!r}; choose response or all")
    state = BatchState()
    caps = {name: LayerCapture(name, mod, method, state) for name, mod in linears.items()}
    device = compute_device(model.get_input_embeddings())
    fwd_kw = _forward_kwargs(model, method)
    grad = method != "wanda"
    nll_sum, n_samples, n_batches = 0.0, 0, 0
    handles = [m.register_forward_hook(c.forward_hook) for c, m in ((c, c.module) for c in caps.values())]
    if grad:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_requires_grad_hook))
    t0 = time.perf_counter()
    try:
        with _frozen(model), _checkpointing(model, gradient_checkpointing), torch.set_grad_enabled(grad):
            for batch_no, (batch, ids) in enumerate(tqdm(batches, total=total, desc=f"score {method}",
                                                          unit="batch", disable=not progress)):
                ids_t = batch["input_ids"].to(device)
                attn = batch["attention_mask"].to(device)
                labels = batch["labels"].to(device)
                if method == "wanda" and wanda_tokens == "response":
                    state.set(labels != formatting.IGNORE)
                else:
                    state.set(attn)
                with state.forward_pass():
                    out = model(input_ids=ids_t, attention_mask=attn, use_cache=False, **fwd_kw)
                if grad:
                    losses = formatting.per_sample_nll(out.logits, labels.to(out.logits.device))
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
    counts = {"samples": n_samples, "batches": n_batches, "nll_sum": nll_sum,
              **{f"calls:{name}": c.calls for name, c in caps.items()}}
    if reduce is not None:
        counts = reduce({name: c.acc for name, c in caps.items()}, counts)
    scores = {}
    for name, c in caps.items():
        with real_weight(c.module) as w:
            s = formulas.finalize(method, w.to(c.acc.device), c.acc, inplace=True)
        c.acc = None
        if not torch.isfinite(s.sum()):  # one reduction: any NaN/inf entry makes the sum non-finite
            raise HarmpruneError(f"{method} scores of {name}.weight are not finite (NaN/inf weights or activations)")
        scores[f"{name}.weight"] = s.to(dtype=score_dtype, device="cpu").contiguous()
    n_samples = int(counts["samples"])
    stats = {
        "samples": n_samples,
        "batches": int(counts["batches"]),
        "mean_nll": counts["nll_sum"] / n_samples if grad and n_samples else None,
        "layers": len(caps),
        "layers_never_run": [n for n in caps if counts[f"calls:{n}"] == 0],
        "layer_calls": {n: int(counts[f"calls:{n}"]) for n in caps},
        "engine_seconds": round(time.perf_counter() - t0, 3),
        "peak_memory_bytes": Stopwatch.peak_memory_bytes(),
    }
    return scores, stats


def compute_scores(model: nn.Module, tokenizer, records, method: str, *, fmt: str | None = "auto",
                   max_length: int = 256, batch_size: int = 4, targets: list[str] | None = None,
                   ignore: list[str] | None = None, wanda_tokens: str = "response",
                   score_dtype: torch.dtype = torch.float32, progress: bool = True,
                   gradient_checkpointing: bool = False, shard: tuple[int, int] = (0, 1),
                   reduce: Reducer | None = None) -> tuple[Scores, dict]:
    """Scores of ``method`` for ``records`` (a list of ``core.data.Record``), no files involved.

    Records are encoded with docs/design.md's formatting (response-only loss), sorted by length so
    batches carry little padding (scores are sums, order does not matter), and right-padded.
    Returns ``({"<module>.weight": float scores}, stats)``; stats adds ``skipped`` (records with
    no response token left after truncation), ``tokens`` (response tokens), ``format``.
    ``shard=(rank, world)`` scores every ``world``-th item of the sorted list from ``rank`` on (so
    every process gets batches of similar lengths); with ``reduce`` summing across the processes
    the result is the whole set's. ``skipped``/``tokens`` always describe the whole set.
    """
    if batch_size < 1:
        raise HarmpruneError("batch_size must be at least 1")
    fmt = formatting.resolve_format(tokenizer, fmt)
    enc = formatting.encode(list(records), tokenizer, fmt, max_length)
    if not enc.items:
        raise HarmpruneError(f"no record has a response token within max_length={max_length}")
    linears = select_linears(model, targets, ignore)
    everything = sorted(enc.items, key=lambda e: len(e.input_ids))
    rank, world = shard
    items = everything[rank::world]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen():
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            yield formatting.collate(chunk, pad), [e.index for e in chunk]

    scores, stats = attribute(model, gen(), method, linears, wanda_tokens=wanda_tokens, progress=progress,
                              total=math.ceil(len(items) / batch_size), score_dtype=score_dtype,
                              gradient_checkpointing=gradient_checkpointing, reduce=reduce)
    stats.update(skipped=enc.skipped, tokens=enc.tokens,
                 input_tokens=sum(len(e.input_ids) for e in everything), format=fmt)
    return scores, stats
