"""`harmprune plan` against measured peak memory (run by hand, not in CI): ``python bench/memory.py``.

For three random-weight Llama configs (~19M, SmolLM2-135M's config, ~410M parameters; SmolLM2's
tokenizer, vocab 49152, tied embeddings) it saves a random-init float32 checkpoint to a temporary
directory and runs ``harmprune score`` (snip, snip-abs and wanda; built-in ``harmful`` data, 8 samples,
batch 4, max length 128) in a fresh subprocess each, one at a time, with OMP_NUM_THREADS=1. The
measured peak is the child's own ``ru_maxrss`` (``os.wait4``), so it includes Python, torch,
transformers, the tokenizer, the data and loading the checkpoint, as ``plan``'s CPU estimate does.
A first child that only imports and loads the tokenizer and data measures the framework baseline.
Checkpoints and estimates (`harmprune plan --json`) are made in subprocesses as well: this process
imports no torch, because a child's ru_maxrss starts at its parent's resident size on Linux.
It prints measured vs ``harmprune.recipes.plan.estimate_score`` and their ratio (target: within 25%).

Needs the cached SmolLM2 conversion (``~/.cache/harmprune/smollm2-135m-instruct``, made by the first
``load_model("smollm2-135m-instruct")``) for its config and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024 ** 3
SMOL = Path(os.environ.get("HARMPRUNE_CACHE", Path.home() / ".cache" / "harmprune")) / "smollm2-135m-instruct"
# name -> overrides of SmolLM2-135M's config (head_dim 64 throughout)
CONFIGS = {
    "llama-19m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64),
    "smollm2-135m": {},
    "llama-410m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=64),
}
BASELINE_CODE = """
import resource, sys
from harmprune.attribution.score import score  # noqa: F401 - the imports harmprune score makes
from harmprune.core.data import DataSpec, load_records
from harmprune.core.models import load_tokenizer
from transformers import LlamaForCausalLM  # noqa: F401
load_tokenizer(sys.argv[1]); load_records(DataSpec(data="harmful"))
"""


def child_env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def run_measured(cmd: list[str], threads: int = 1) -> tuple[int, float, str]:
    """Run ``cmd`` to completion; return (the child's own peak RSS in bytes, wall seconds, output tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not all children's maximum
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, tail


MAKE_CODE = """
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
smol, out, overrides = sys.argv[1], sys.argv[2], eval(sys.argv[3])
cfg = LlamaConfig.from_pretrained(smol)
for k, v in overrides.items():
    setattr(cfg, k, v)
torch.manual_seed(0)
LlamaForCausalLM(cfg).float().save_pretrained(out)
AutoTokenizer.from_pretrained(smol).save_pretrained(out)
"""


def make_checkpoint(name: str, directory: Path) -> Path:
    """A random-init float32 Llama of config ``name`` with SmolLM2's tokenizer, saved to ``directory/name``.

    Built in a subprocess: this process must stay small, because Linux starts a child's ``ru_maxrss``
    at its parent's resident size (the high-water mark survives fork + exec).
    """
    if not (SMOL / "config.json").exists():
        sys.exit(f"{SMOL} not found: run harmprune once with the smollm2-135m-instruct alias to convert it")
    out = directory / name
    if not (out / "config.json").exists():
        run_measured([sys.executable, "-c", MAKE_CODE, str(SMOL), str(out), repr(CONFIGS[name])])
    return out


def score_cmd(ckpt: Path, out: Path, method: str, nsamples: int, batch: int, length: int) -> list[str]:
    return [sys.executable, "-m", "harmprune.cli", "score", "--model", str(ckpt), "--out", str(out),
            "--method", method, "--nsamples", str(nsamples), "--batch-size", str(batch),
            "--max-length", str(length), "--data", "harmful", "--overwrite"]


def estimate(ckpt: Path, method: str, nsamples: int, batch: int, length: int) -> tuple[dict, dict]:
    """``harmprune plan --json`` for the run (a subprocess too): (model counts, the score stage)."""
    out = subprocess.run([sys.executable, "-m", "harmprune.cli", "plan", "--model", str(ckpt), "--method", method,
                          "--nsamples", str(nsamples), "--batch-size", str(batch), "--max-length", str(length),
                          "--json"], env=child_env(), capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    return data["model"], next(s for s in data["stages"] if s["stage"] == f"score {method}")


def measure_score(ckpt: Path, work: Path, method: str, nsamples: int, batch: int, length: int, threads: int = 1):
    """One ``harmprune score`` child: (peak RSS bytes, wall s, meta.json)."""
    out = work / f"scores-{ckpt.name}-{method}-{nsamples}"
    rss, wall, _ = run_measured(score_cmd(ckpt, out, method, nsamples, batch, length), threads)
    return rss, wall, json.loads((out / "meta.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=["snip", "snip-abs", "wanda"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="harmprune-memory-") as tmp:
        work = Path(tmp)
        base, _, _ = run_measured([sys.executable, "-c", BASELINE_CODE, str(SMOL)])
        print(f"framework baseline (imports + tokenizer + data): {base / GiB:.3f} GiB", flush=True)
        print(f"{'config':<14}{'params':>9}  {'method':<9}{'measured GiB':>13}{'estimate GiB':>13}"
              f"{'est/meas':>9}{'wall s':>8}", flush=True)
        for name in args.configs:
            ckpt = make_checkpoint(name, work)
            for method in args.methods:
                rss, wall, meta = measure_score(ckpt, work, method, args.nsamples, args.batch_size, args.max_length)
                shape, est = estimate(ckpt, method, args.nsamples, args.batch_size, args.max_length)
                row = {"config": name, "params": shape["params"], "method": method, "measured_bytes": rss,
                       "estimate_bytes": est["peak_bytes"], "ratio": est["peak_bytes"] / rss,
                       "wall_s": round(wall, 1), "input_tokens": meta["tokens"]["input"], "parts": est["parts"]}
                rows.append(row)
                print(f"{name:<14}{shape['params'] / 1e6:>8.1f}M  {method:<9}{rss / GiB:>13.3f}{est['peak_bytes'] / GiB:>13.3f}"
                      f"{row['ratio']:>9.2f}{wall:>8.1f}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest miss: {worst:.0%} (target <= 25%: {'met' if worst <= 0.25 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline_bytes": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
