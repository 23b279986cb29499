"""Real-size attribution on one GPU (run by hand on a CUDA machine): ``python bench/gpu_8b.py``.

A random-weight Llama-3-8B config (hidden 4096, 32 layers, intermediate 14336, 32 heads / 8 KV
heads, vocab 128256, untied head) in bfloat16 on one CUDA device; ``harmprune``'s attribution engine
(``attribute``: one forward + one backward per batch over all layers, float32 accumulators) scores
``--nsamples`` random sequences of ``--seq`` tokens (response = second half). After one warm-up
batch it times the run (CUDA-synchronised) and prints seconds per sample, the extrapolation to 412
samples next to B-TAP's reported ~20 min for 412 samples on one L40, ``torch.cuda.max_memory_allocated``
and ``harmprune plan``'s estimate for the same settings. Memory (snip, batch 4 x 256): ~15 GiB
bf16 weights + ~26 GiB float32 accumulators + activations; fits an 80 GB H100.

Without CUDA it stops with a clear message. Random weights and tokens: the cost of a pass does not
depend on the values.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
BTAP_SECONDS, BTAP_SAMPLES = 20 * 60, 412  # B-TAP, one L40 (paper's report)
GiB = 1024 ** 3


def batches(n: int, batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        yield ({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}, list(range(start, start + b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="snip", choices=["snip", "snip-abs", "wanda"])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32, help="fewer for a quick check")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        sys.exit("bench/gpu_8b.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "it measures an 8B-parameter model in bfloat16 and has no CPU mode")
    from transformers import LlamaConfig, LlamaForCausalLM

    from harmprune.attribution.engine import attribute
    from harmprune.core.targets import select_linears
    from harmprune.recipes.plan import PlanConfig, estimate_score, shape_of

    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    linears = select_linears(model)
    kw = dict(method=args.method, linears=linears, progress=False,
              gradient_checkpointing=args.gradient_checkpointing)
    print(f"{torch.cuda.get_device_name()}: Llama-3-8B config, {args.layers} layers, {n_params / 1e9:.2f}B "
          f"parameters, bf16; {args.method}, {args.nsamples} samples x {args.seq} tokens, batch {args.batch_size}",
          flush=True)

    attribute(model, batches(args.batch_size, args.batch_size, args.seq, cfg.vocab_size, args.device), **kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, stats = attribute(model, batches(args.nsamples, args.batch_size, args.seq, cfg.vocab_size, args.device),
                         total=math.ceil(args.nsamples / args.batch_size), **kw)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()

    plan_cfg = PlanConfig(model="llama-3-8b", methods=[args.method], nsamples=args.nsamples,
                          batch_size=args.batch_size, max_length=args.seq, dtype="bfloat16", device="cuda",
                          gradient_checkpointing=args.gradient_checkpointing)
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cfg)
    est = estimate_score(shape_of(meta_model, cfg, "llama-3-8b"), plan_cfg, args.method)

    per = secs / stats["samples"]
    print(f"seconds per sample:         {per:.3f}  ({secs:.1f} s for {stats['samples']} samples, "
          f"{stats['batches']} batches)")
    print(f"412 samples would take:     {per * BTAP_SAMPLES / 60:.1f} min  "
          f"(B-TAP: ~{BTAP_SECONDS / 60:.0f} min on one L40, {BTAP_SECONDS / BTAP_SAMPLES:.2f} s/sample; "
          f"x{BTAP_SECONDS / BTAP_SAMPLES / per:.1f} faster here)")
    print(f"torch.cuda.max_memory_allocated: {peak / GiB:.2f} GiB; harmprune plan estimate: "
          f"{est.peak / GiB:.2f} GiB (ratio {est.peak / peak:.2f})")


if __name__ == "__main__":
    main()
