"""Attribution engine benchmark (run by hand, not in CI): ``python bench/attribution.py``.

On a randomly initialised SmolLM2-135M-sized Llama (tied embeddings) and a few random batches
(response = second half of each sequence) it prints, in one run:
- the time of ``snip``, ``snip-abs`` and ``wanda`` divided by a plain forward+backward
  (``loss.backward()`` with weight gradients) over the same batches;
- the time of the papers' layer-by-layer algorithm (one full forward+backward per decoder layer,
  only that layer's weights requiring grad) divided by ours (``snip``);
- the peak memory of each.
Every measurement runs in a fresh subprocess (same seed, same model and batches). Time: the second
of two passes (the first warms up), both wall time and process CPU time (user+sys); the children
run with OMP_WAIT_POLICY=PASSIVE so idle threads do not spin, which makes CPU time a fair measure
of work when other processes share the machine (wall-time ratios are then unreliable).
Memory: peak process RSS above the RSS after the model and
batches were built, sampled every 5 ms by a psutil thread during the first pass.
Targets (issue 2): snip <= 1.2x, snip-abs <= 1.6x, wanda <= 0.6x of forward+backward;
layer-by-layer >= L/2 x slower than ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = ("fwdbwd", "snip", "snip-abs", "wanda", "layer-by-layer")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq))
        labels = ids.clone()
        labels[:, : args.seq // 2] = -100
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                        list(range(args.batch_size))))
    return model, batches


class PeakRSS:
    """Max RSS of this process above a baseline, sampled by a background thread."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.base


def fwdbwd(model, batches):
    from harmprune.core.formatting import per_sample_nll

    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for batch, _ in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        per_sample_nll(out.logits, batch["labels"]).sum().backward()


def ours(method):
    def run(model, batches):
        from harmprune.attribution import attribute
        from harmprune.core.targets import select_linears

        attribute(model, batches, method, select_linears(model), progress=False)

    return run


def layer_by_layer(model, batches, layer_no):
    """One layer's scores the papers' way: a full forward+backward with only that layer trainable."""
    import torch

    from harmprune.core.formatting import per_sample_nll
    from harmprune.core.targets import select_linears

    lins = {n: m for n, m in select_linears(model).items() if f".{layer_no}." in n}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lins.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    for batch, _ in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        per_sample_nll(out.logits, batch["labels"]).sum().backward()
    with torch.no_grad():
        return {n: m.weight * m.weight.grad for n, m in lins.items()}


def child(args):
    import torch

    model, batches = build(args)
    if args.child == "layer-by-layer":
        n = min(args.lbl_layers, args.layers)
        picks = sorted({round(i * (args.layers - 1) / max(1, n - 1)) for i in range(n)})
        with PeakRSS() as mem:
            layer_by_layer(model, batches[:1], picks[0])  # warm-up
            times, cpu = [], []
            for layer in picks:
                t0, c0 = time.perf_counter(), time.process_time()
                layer_by_layer(model, batches, layer)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        result = {"seconds": sum(times) / len(times) * args.layers, "cpu_seconds": sum(cpu) / len(cpu) * args.layers,
                  "timed_layers": picks, "per_layer": times}
    else:
        fn = fwdbwd if args.child == "fwdbwd" else ours(args.child)
        with PeakRSS() as mem:
            fn(model, batches)
        t0, c0 = time.perf_counter(), time.process_time()
        fn(model, batches)
        result = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    result.update(peak_rss_delta_mb=mem.delta / 2**20, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result))


def parent(args):
    import torch

    passthrough = ["--layers", args.layers, "--batches", args.batches, "--batch-size", args.batch_size,
                   "--seq", args.seq, "--lbl-layers", args.lbl_layers]
    print(f"attribution bench: Llama hidden 576, intermediate 1536, {args.layers} layers, 9 heads / 3 kv heads, "
          f"vocab 49152, tied; {args.batches} batches x {args.batch_size} x {args.seq} tokens (response = 2nd half)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    res = {}
    for kind in KINDS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, *map(str, passthrough)]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        res[kind] = json.loads(line[7:])
        extra = ""
        if kind == "layer-by-layer":
            extra = (f"  (layers {res[kind]['timed_layers']} timed, "
                     f"{', '.join(f'{t:.1f}' for t in res[kind]['per_layer'])} s; mean x {args.layers} layers)")
        r = res[kind]
        print(f"  {kind:<15} wall {r['seconds']:8.2f} s  cpu {r['cpu_seconds']:8.2f} s  "
              f"peak RSS +{r['peak_rss_delta_mb']:7.0f} MiB{extra}", flush=True)
    targets = {"snip": 1.2, "snip-abs": 1.6, "wanda": 0.6}
    need = args.layers / 2
    for clock in ("seconds", "cpu_seconds"):
        base = res["fwdbwd"][clock]
        print(f"{'wall' if clock == 'seconds' else 'CPU'} time / plain forward+backward:")
        for m, t in targets.items():
            r = res[m][clock] / base
            print(f"  {m:<9} {r:5.2f}x   (target <= {t}x: {'met' if r <= t else 'MISSED'})")
        r = res["layer-by-layer"][clock] / res["snip"][clock]
        print(f"  layer-by-layer / ours (snip): {r:5.1f}x   (target >= L/2 = {need:g}x: "
              f"{'met' if r >= need else 'MISSED'}; extrapolated from the timed layers)")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on this machine inflate times)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--batches", type=int, default=2, help="batches per pass")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--lbl-layers", type=int, default=3, help="layers timed for layer-by-layer (extrapolated to all)")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
