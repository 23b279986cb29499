"""Run provenance: banners, versions, hashes, JSON files and atomic output directories."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

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
    """Refuse a non-empty output directory unless overwrite is set, and a location that cannot be
    written; remove (or report) temporary siblings that interrupted runs left behind."""
    out = Path(out)
    from .validate import check_writable_dir

    check_writable_dir(out)  # also refuses a regular file, even with --overwrite
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HarmpruneError(f"{out} exists and is not empty; pass --overwrite to replace it")
    clean_stale_siblings(out)
    return out


# ---------------------------------------------------------------- atomic output directories

_REPORTED: set[Path] = set()
STALE_AFTER_S = 3600  # a foreign temporary sibling untouched this long is reported as left over


def _tmp_prefix(out: Path) -> str:
    # host and pid in the name let a later run tell a dead writer's leftovers from a live writer's
    return f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(tmp: Path, out: Path) -> tuple[str, int] | None:
    """(host, pid) encoded in a temporary sibling's name, or None for names without them."""
    rest = tmp.name[len(f".{out.name}.tmp-"):]
    m = re.fullmatch(r"(.+)-(\d+)-[^-]+", rest)
    return (m.group(1), int(m.group(2))) if m else None


def stale_siblings(out: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Temporary siblings of ``out`` left by interrupted writers: ``(removable, suspicious)``.

    Removable: written on this host by a process that no longer runs (killed, crashed).
    Suspicious: any other ``.NAME.tmp-*`` / ``.NAME.old-*`` untouched for ``STALE_AFTER_S`` (another
    host's writer on a shared file system, or an older harmprune): reported, never deleted.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return [], []
    removable, suspicious = [], []
    host, now = socket.gethostname(), time.time()
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        if not (p.name.startswith(f".{out.name}.tmp-") or p.name.startswith(f".{out.name}.old-")):
            continue
        owner = _owner(p, out) if p.name.startswith(f".{out.name}.tmp-") else None
        if owner and owner[0] == host and owner[1] != os.getpid() and not _pid_alive(owner[1]):
            removable.append(p)
        elif owner is None or owner[0] != host:
            try:
                if now - p.stat().st_mtime > STALE_AFTER_S:
                    suspicious.append(p)
            except OSError:
                continue
    return removable, suspicious


def clean_stale_siblings(out: str | os.PathLike) -> None:
    """Remove the removable leftovers of ``out`` (one note line) and warn about the suspicious ones."""
    from .validate import warn

    removable, suspicious = stale_siblings(out)
    for p in removable:
        shutil.rmtree(p, ignore_errors=True)
    if removable:
        print(f"harmprune: removed {len(removable)} temporary director{'y' if len(removable) == 1 else 'ies'} "
              f"left by an interrupted run next to {out}", file=sys.stderr)
    new = [p for p in suspicious if p not in _REPORTED]  # check_out_dir runs at start and at the write
    _REPORTED.update(new)
    if new:
        suspicious = new
        warn(f"{len(suspicious)} old temporary director{'y' if len(suspicious) == 1 else 'ies'} next to {out} "
             f"(e.g. {suspicious[0]}) from an interrupted run: delete them if no other harmprune run is writing {out}")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False,
               exists_ok: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; when the block succeeds, rename it to ``out``.

    Contract:
    - Every writer gets its own temporary sibling ``.NAME.tmp-<host>-<pid>-<random>``; the final
      ``rename`` is atomic, so readers see either no ``out`` or a complete one, never a mixture.
    - A crash, exception, KeyboardInterrupt or SIGTERM (see :func:`install_signal_handlers`)
      inside the block removes the temporary directory. A SIGKILL cannot be caught: the next
      ``check_out_dir``/``atomic_dir`` on the same ``out`` removes such leftovers.
    - ``out`` existing when the block ends (including another writer finishing first):
      ``exists_ok(out)`` returning True means "someone else already wrote the same output": this
      writer's directory is discarded and the call succeeds (the caller reads ``out``). Otherwise
      ``overwrite`` replaces ``out`` (atomically swapped, then the old one deleted); otherwise a
      one-line HarmpruneError. ``exists_ok`` must check that ``out`` holds what this writer was
      producing (e.g. the same content key), since ``out`` may come from another writer.
    - With ``exists_ok`` the non-empty check at entry is left to the caller (a cache looks up
      ``out`` before computing); without it, a non-empty ``out`` fails at entry unless ``overwrite``.
    """
    out = Path(out)
    if exists_ok is None:
        check_out_dir(out, overwrite)
    else:
        check_out_dir(out, True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    try:
        yield tmp
        _publish(tmp, out, overwrite, exists_ok)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, overwrite: bool, exists_ok: Callable[[Path], bool] | None) -> None:
    try:
        tmp.rename(out)  # atomic; fails when another writer's non-empty out is already there
        return
    except OSError:
        if not out.exists():
            raise
    if exists_ok is not None and exists_ok(out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if not overwrite:
        raise HarmpruneError(f"{out} exists and is not empty; pass --overwrite to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- scratch directories


@contextlib.contextmanager
def work_dir(kind: str) -> Iterator[Path]:
    """A scratch directory ``<tmp>/<kind>-<host>-<pid>-<random>`` removed when the block ends; those of
    dead processes of this host (a SIGKILL runs no cleanup) are removed first."""
    base, host = Path(tempfile.gettempdir()), socket.gethostname()
    for p in base.glob(f"{glob.escape(kind)}-{glob.escape(host)}-*"):
        m = re.fullmatch(rf"{re.escape(kind)}-{re.escape(host)}-(\d+)-[^-]+", p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    d = Path(tempfile.mkdtemp(prefix=f"{kind}-{host}-{os.getpid()}-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP, so cleanup runs exactly as for Ctrl-C."""


def _raise_terminated(signum, _frame):
    raise Terminated(f"received {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """Handle SIGTERM (and SIGHUP) like SIGINT: raise :class:`Terminated` (a KeyboardInterrupt) in
    the main thread, so every ``atomic_dir`` removes its temporary directory and the CLI ends with
    its interrupted line. Call once from the CLI entry point (main thread only; no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _raise_terminated)


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
