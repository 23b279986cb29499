"""Greedy generation throughput on the embedded model against this machine's memory-bandwidth bound.

Run by hand: ``.venv/bin/python bench/generation.py`` (a few minutes on a 2-core CPU). One run measures:
- memory bandwidth: the best of several copies of a large float32 tensor (bytes read + bytes written / s),
  and, for comparison, float32 matrix-product throughput (GFLOP/s);
- for each batch size (default 8 16 32 64) over the same prompts (sorted by length, as the engine
  does): new tokens/s (real tokens up to EOS / wall time, prefill included) and the *decode*
  throughput (every row of the batch for every step after the first, timed per step through a
  stopping-criteria clock, so the prefill is left out), and that decode throughput as a fraction of
  the bound ``bandwidth / bytes of weights read per step x batch`` (a decode step reads every weight
  once, whatever the batch);
- how many replies are token-for-token the same as at batch 8 (the old default) and as one at a time
  (the first ``--single-prompts`` prompts at batch 1).
The row of the engine's default batch on this device (``backends.default_batch_size``) is marked.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from harmprune.core.formatting import resolve_format
from harmprune.core.manifest import banner
from harmprune.core.models import load_model
from harmprune.evals.backends import default_batch_size
from harmprune.evals.generation import GenConfig, build_inputs, generate_tokens

FALLBACK = [f"Explain, step by step, how {x} works." for x in (
    "a bicycle", "a refrigerator", "photosynthesis", "a compiler", "the stock market", "a vaccine", "radar",
    "a jet engine", "public-key cryptography", "a nuclear reactor", "a lock", "a search engine", "GPS",
    "a battery", "a printing press", "an elevator")]


def prompts(n: int) -> tuple[list[str], str]:
    try:
        from harmprune.core.data import load

        ps = list(dict.fromkeys(r.prompt for r in load("harmful:all")))
        if len(ps) >= n:
            return ps[:n], "built-in harmful:all (distinct prompts)"
    except Exception as e:  # data layer missing or changed: the bench still runs
        print(f"built-in data unavailable ({e}); using fixed prompts")
    return (FALLBACK * (n // len(FALLBACK) + 1))[:n], "fixed strings"


def copy_bandwidth(mib: int = 512, reps: int = 7) -> float:
    """Bytes/s of the best ``dst.copy_(src)`` of a ``mib`` MiB float32 tensor (read + write counted)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # page in both
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def matmul_flops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def weight_bytes_per_step(model) -> tuple[int, int]:
    """(bytes of weights one decode step reads, parameters multiplied per token): every distinct
    parameter once (a tied embedding/head matrix counts once: the head reads all of it); an untied
    input embedding is only indexed (a few rows), so it is left out."""
    seen, total, mult = set(), 0, 0
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and not tied:
            continue
        total += p.numel() * p.element_size()
        mult += p.numel() if p.dim() >= 2 else 0
    return total, mult


class StepClock:
    """A transformers stopping criterion that never stops: it notes the time of every step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kw):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run(model, tok, ctx, cfg) -> tuple[list[list[int]], float, list[tuple[int, float, float, int]]]:
    """(greedy new ids per prompt, wall s, per batch (rows, prefill s, decode s, decode steps))."""
    from transformers import StoppingCriteriaList

    batches = []
    orig = model.generate

    def timed(*a, **kw):
        clock, t0 = StepClock(), time.perf_counter()
        out = orig(*a, stopping_criteria=StoppingCriteriaList([clock]), **kw)
        rows = kw["input_ids"].shape[0]
        batches.append((rows, clock.times[0] - t0, clock.times[-1] - clock.times[0], len(clock.times) - 1))
        return out

    model.generate = timed
    try:
        t = time.perf_counter()
        out = generate_tokens(model, tok, ctx, cfg, desc=f"batch {cfg.gen_batch_size}")
        wall = time.perf_counter() - t
    finally:
        del model.generate
    return [o[0] for o in out], wall, batches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per reply (make prune's headline: 48)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--single-prompts", type=int, default=4, help="prompts generated one at a time")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 is fairer when other jobs share the CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bw, flops = copy_bandwidth(), matmul_flops()
    model, tok = load_model("smollm2-135m-instruct")
    wbytes, mult = weight_bytes_per_step(model)
    default = default_batch_size(model.device)
    ps, source = prompts(args.n_prompts)
    banner("bench generation", {"model": "smollm2-135m-instruct (float32, CPU)", "prompts": f"{len(ps)} from {source}",
                                "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                                "load average": " ".join(f"{x:.1f}" for x in os.getloadavg())})
    ctx, _ = build_inputs(tok, ps, resolve_format(tok, "auto"))
    generate_tokens(model, tok, ctx[:2], GenConfig(max_new_tokens=4, gen_batch_size=2), desc="warm-up")

    k = min(args.single_prompts, len(ctx))
    single, t1, _ = run(model, tok, ctx[:k], GenConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=1))
    n1 = sum(len(s) for s in single)
    print(f"batch 1: {k} prompts, {n1} tokens in {t1:.1f} s", flush=True)
    rows, ref = [], None
    for bs in args.batch_sizes:
        out, t, batches = run(model, tok, ctx, GenConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=bs))
        ref = out if ref is None else ref
        toks = sum(len(o) for o in out)
        slots = sum(r * steps for r, _, _, steps in batches)
        decode_s, prefill_s = sum(b[2] for b in batches), sum(b[1] for b in batches)
        decode_tps = slots / decode_s
        bound = bw / wbytes * bs
        rows.append((bs, toks, t, toks / t, prefill_s, decode_tps, bound, decode_tps / bound,
                     f"{sum(o == r for o, r in zip(out, ref))}/{len(out)}",
                     f"{sum(o == s for o, s in zip(out, single))}/{k}"))
        print(f"batch {bs}: {len(out)} prompts, {toks} tokens in {t:.1f} s", flush=True)

    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs slow every row)")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; float32 matmul {flops / 1e9:.0f} GFLOP/s; weights read per decode step "
          f"{wbytes / 1e6:.0f} MB ({mult / 1e6:.0f}M multiplied parameters: compute bound "
          f"{flops / (2 * mult):.0f} tokens/s at any batch)")
    print(f"{len(ps)} prompts, max_new_tokens {args.max_new_tokens}, prompt tokens {min(map(len, ctx))}-"
          f"{max(map(len, ctx))}, {torch.get_num_threads()} threads; batch 1: {n1 / t1:.1f} tokens/s; "
          f"default batch on {model.device.type}: {default}")
    print(f"| batch | new tokens | wall s | tokens/s | prefill s | decode tokens/s | bandwidth bound | fraction "
          f"| same as batch {args.batch_sizes[0]} | same as alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bs, toks, t, tps, pre, dec, bound, frac, same_ref, same1 in rows:
        mark = " (default)" if bs == default else ""
        print(f"| {bs}{mark} | {toks} | {t:.1f} | {tps:.1f} | {pre:.1f} | {dec:.1f} | {bound:.0f} | {frac:.0%} "
              f"| {same_ref} | {same1} |")


if __name__ == "__main__":
    main()
