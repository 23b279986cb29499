"""safetensors files written byte-reproducibly and read with one-line errors.

``safetensors.torch.save_file`` serialises ``metadata`` from a hash map whose order changes from
process to process, so identical tensors gave files with different sha256 (and a provenance hash
that changed for identical scores). :func:`write` builds the header itself: metadata keys sorted,
tensors ordered by (element size descending, name) so every tensor stays aligned, header padded
with spaces to a multiple of 8 (the layout safetensors itself writes; any safetensors reader
loads it). Same tensors + same metadata -> same bytes.

:func:`check` validates a file's framing (header length, JSON, offsets, file size) without reading
the data, so a file cut short is reported as one line naming it and what to do, before slow work.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .errors import HarmpruneError

_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
           torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
           torch.float64: "F64"}


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any device, made contiguous on CPU) with string ``metadata`` deterministically."""
    items = []
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported by this writer")
        items.append((name, t.detach().to("cpu").contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def check(path: str | os.PathLike, what: str, fix: str) -> dict:
    """Return the header of safetensors file ``path``, or raise one line: ``<path>: <what> is
    corrupt or cut short (<why>); <fix>``. Reads only the header (cheap for any file size)."""
    p = Path(path)

    def bad(why: str):
        return HarmpruneError(f"{p}: {what} is corrupt or cut short ({why}); {fix}")

    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise bad(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise HarmpruneError(f"{p}: cannot read {what} ({e.strerror}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("unreadable header") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise bad(f"no data offsets for {name}") from None
    if 8 + n + end != size:
        raise bad(f"{size} bytes, the header describes {8 + n + end}")
    return header


def load(path: str | os.PathLike, what: str, fix: str) -> dict[str, torch.Tensor]:
    """All tensors of ``path`` after :func:`check`; a later read error is reported the same way."""
    from safetensors.torch import load_file

    check(path, what, fix)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for corrupt data
        raise HarmpruneError(f"{path}: {what} is corrupt ({str(e).splitlines()[0]}); {fix}") from None


def metadata(path: str | os.PathLike, what: str, fix: str) -> dict[str, str]:
    """The ``__metadata__`` of a checked file (``{}`` when it has none)."""
    return dict(check(path, what, fix).get("__metadata__") or {})
