"""Scaling of ``harmprune score`` on this CPU (run by hand): ``python bench/scaling.py``.

Time and peak memory (a) against model size (the three random-weight Llama configs of
``bench/memory.py``, fixed number of samples) and (b) against the number of samples on the smallest
config. Each run is a fresh ``harmprune score`` subprocess (built-in ``harmful`` data, batch 4,
max length 128, snip unless ``--method``), one at a time, ``--threads`` OpenMP threads (default 1).
Seconds per sample = the engine's own time (``meta.json`` ``engine_seconds``, loading excluded) /
samples; the peak is the child's ``ru_maxrss``. On a shared CPU the times are upper bounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import CONFIGS, GiB, make_checkpoint, measure_score  # noqa: E402


def row(label: str, ckpt: Path, work: Path, method: str, n: int, batch: int, length: int, threads: int) -> dict:
    rss, wall, meta = measure_score(ckpt, work, method, n, batch, length, threads)
    eng = meta["engine_seconds"]
    used = meta["nsamples"]["used"]
    r = {"run": label, "samples": used, "wall_s": round(wall, 1), "engine_s": eng,
         "s_per_sample": eng / used, "peak_gib": rss / GiB, "tokens": meta["tokens"]["input"]}
    print(f"{label:<24}{used:>8}{r['tokens']:>8}{wall:>9.1f}{eng:>10.1f}{r['s_per_sample']:>10.2f}"
          f"{r['peak_gib']:>10.2f}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="snip")
    ap.add_argument("--size-samples", type=int, default=8, help="samples per run of the model-size series")
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32], help="the sample-count series")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"{'run':<24}{'samples':>8}{'tokens':>8}{'wall s':>9}{'engine s':>10}{'s/sample':>10}{'peak GiB':>10}")
    with tempfile.TemporaryDirectory(prefix="harmprune-scaling-") as tmp:
        work = Path(tmp)
        for name in args.configs:
            ckpt = make_checkpoint(name, work)
            row(f"size {name}", ckpt, work, args.method, args.size_samples, args.batch_size, args.max_length,
                args.threads)
        small = make_checkpoint(args.configs[0], work)
        for n in args.samples:
            row(f"samples {args.configs[0]}", small, work, args.method, n, args.batch_size, args.max_length,
                args.threads)


if __name__ == "__main__":
    main()
