"""bench/gpu_check.py without CUDA: every check says it was skipped and why, exit code 0."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_every_check_is_skipped_with_the_reason():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {ln.split(")")[0].lstrip("("): ln for ln in r.stdout.splitlines() if ln.startswith("(")}
    assert set(lines) == {"a", "b", "c", "d", "e", "d-vllm", "e-qlora"}
    for name, ln in lines.items():
        assert ln.split()[1] == "SKIP" and "CUDA is not available" in ln, ln
    for name, pkg in (("d-vllm", "vllm"), ("e-qlora", "bitsandbytes")):
        if importlib.util.find_spec(pkg) is None:
            assert f"{pkg} is not installed" in lines[name]


def test_helpers_by_hand():
    gc = _load()
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])
    assert gc.rel_err(a, b) == 4.0 / 3.0  # ||(0, 4)|| / ||(3, 0)||
    assert gc.rel_err(b, b) == 0.0
    x = torch.arange(200.0)
    y = x.clone()
    y[199] = -1.0  # the top-1% (2 entries) of y: 198 and 197; of x: 199 and 198
    assert gc.top_overlap(x, y) == 1 / 3
