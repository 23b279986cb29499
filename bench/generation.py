"""Batched vs one-prompt-at-a-time greedy generation throughput on the embedded model.

Run by hand: ``.venv/bin/python bench/generation.py`` (a few minutes on a 2-core CPU).
Prints tokens/s for batch size 1 and each batched size, the speed-up (target >= 6x), and how many
prompts got token-for-token the same greedy reply batched as alone. Tokens/s is a rate, so the
one-at-a-time run uses only the first ``--single-prompts`` prompts (it is the slow one).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from harmprune.core.formatting import resolve_format
from harmprune.core.manifest import banner
from harmprune.core.models import load_model
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


def run(model, tok, ctx, cfg) -> tuple[list[list[int]], float]:
    t = time.perf_counter()
    out = generate_tokens(model, tok, ctx, cfg, desc=f"batch {cfg.batch_size}")
    return [o[0] for o in out], time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--single-prompts", type=int, default=8, help="prompts generated one at a time")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 is fairer when other jobs share the CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model("smollm2-135m-instruct")
    ps, source = prompts(args.n_prompts)
    banner("bench generation", {"model": "smollm2-135m-instruct (float32, CPU)", "prompts": f"{len(ps)} from {source}",
                                "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                                "load average": " ".join(f"{x:.1f}" for x in os.getloadavg())})
    ctx, _ = build_inputs(tok, ps, resolve_format(tok, "auto"))
    generate_tokens(model, tok, ctx[:2], GenConfig(max_new_tokens=4, gen_batch_size=2), desc="warm-up")

    k = min(args.single_prompts, len(ctx))
    single, t1 = run(model, tok, ctx[:k], GenConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=1))
    n_tok = sum(len(s) for s in single)
    rows = [(1, len(single), n_tok, t1, n_tok / t1, 1.0, "-")]
    print(f"batch 1: {k} prompts, {n_tok} tokens in {t1:.1f} s", flush=True)
    for bs in args.batch_sizes:
        out, t = run(model, tok, ctx, GenConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=bs))
        toks = sum(len(o) for o in out)
        same = f"{sum(o == s for o, s in zip(out, single))}/{k}"
        rows.append((bs, len(out), toks, t, toks / t, (toks / t) / (n_tok / t1), same))
        print(f"batch {bs}: {len(out)} prompts, {toks} tokens in {t:.1f} s", flush=True)

    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs slow every row)")
    print(f"{len(ps)} prompts, max_new_tokens {args.max_new_tokens}, prompt tokens "
          f"{min(map(len, ctx))}-{max(map(len, ctx))}, {torch.get_num_threads()} threads")
    print("| batch | prompts | new tokens | wall s | tokens/s | speed-up | same greedy reply as alone |")
    print("|---|---|---|---|---|---|---|")
    for bs, n, toks, t, tps, sp, same in rows:
        print(f"| {bs} | {n} | {toks} | {t:.1f} | {tps:.1f} | {sp:.1f}x | {same} |")


if __name__ == "__main__":
    main()
