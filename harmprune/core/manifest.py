"""Run provenance: banners, versions, hashes, JSON files and atomic output directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import HarmpruneError

_PACKAGES = ("harmprune", "torch", "transformers", "accelerate", "safetensors", "datasets", "peft", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results (absent ones are left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def banner(title: str, config: dict, stream=None) -> None:
    """Print the resolved settings and versions before long work starts (to stderr)."""
    stream = stream or sys.stderr
    print(f"== harmprune {title} ==", file=stream)
    for k, v in config.items():
        print(f"  {k:<16} {v}", file=stream)
    print("  versions         " + ", ".join(f"{k} {v}" for k, v in versions().items()), file=stream)
    stream.flush()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless overwrite is set."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HarmpruneError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it to ``out``.

    A crash or interrupt inside the block removes the temporary directory, so ``out`` is never
    left half written (an existing ``out`` is only replaced after the new one is complete).
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class Stopwatch:
    """Wall time and peak memory (CUDA when used, else process RSS high-water mark) of a block."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

    @staticmethod
    def peak_memory_bytes() -> int:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return int(torch.cuda.max_memory_allocated())
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:  # pragma: no cover - non-POSIX
            return 0
