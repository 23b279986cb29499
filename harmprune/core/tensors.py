"""Checkpoints as streams of named tensors: read one tensor at a time from safetensors files.

A model spec is anything ``core.models.resolve`` understands (local HF directory, alias, Hub id; a
Hub id is fetched with ``huggingface_hub.snapshot_download``). Only safetensors checkpoints are
read: a ``.gguf`` file or a ``pytorch_model.bin``-only directory is refused with one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import HarmpruneError
from .models import check_weight_files, resolve

HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def local_checkpoint(spec: str) -> Path:
    """A local directory holding ``spec``'s safetensors files (downloaded for a Hub id)."""
    path, gguf = resolve(spec)
    if gguf:
        raise HarmpruneError(f"{spec}: a .gguf file has no safetensors tensors to stream; load and save it as a "
                             "Hugging Face checkpoint first (or use its alias)")
    p = Path(path)
    if not p.exists():  # a Hub id: the real download path, untested offline
        from huggingface_hub import snapshot_download

        try:
            p = Path(snapshot_download(path, allow_patterns=HUB_FILES))
        except Exception as e:  # network, auth, missing repo: one line either way
            raise HarmpruneError(f"cannot download {spec} from the Hub: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not any(p.glob("*.safetensors")):
        raise HarmpruneError(f"{spec}: no .safetensors files in {p} (only safetensors checkpoints can be streamed)")
    return p


class TensorReader:
    """Names, shapes and lazily read tensors of one checkpoint directory; use as a context manager.

    Only one tensor is materialised per :meth:`get` call; file handles stay open until exit.
    """

    def __init__(self, spec: str, label: str):
        self.spec, self.label = spec, label
        self.dir = local_checkpoint(spec)
        check_weight_files(str(self.dir))  # a cut-short file: one line naming it, not a SafetensorError
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> "TensorReader":
        from safetensors import safe_open

        files = sorted(f for f in self.dir.glob("*.safetensors") if f.name != "mask.safetensors")
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                self._where[key] = handle
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name`` in float32 on ``device``."""
        if name not in self._where:
            raise HarmpruneError(f"{self.label} ({self.spec}) has no tensor {name}")
        return self._where[name].get_tensor(name).to(device=device, dtype=torch.float32)


def check_same_layout(readers: list[TensorReader]) -> None:
    """Refuse checkpoints whose tensor names or shapes differ: one line naming the first mismatch."""
    first = readers[0]
    for other in readers[1:]:
        for name in sorted(set(first.shapes) | set(other.shapes)):
            a, b = first.shapes.get(name), other.shapes.get(name)
            if a == b:
                continue
            if a is None or b is None:
                has, lacks = (first, other) if b is None else (other, first)
                raise HarmpruneError(f"{first.label} and {other.label} differ at parameter {name}: present in "
                                     f"{has.label} ({has.spec}), absent from {lacks.label} ({lacks.spec}); "
                                     "the models must share one architecture")
            raise HarmpruneError(f"{first.label} and {other.label} differ at parameter {name}: shape {list(a)} in "
                                 f"{first.label} ({first.spec}) vs {list(b)} in {other.label} ({other.spec}); "
                                 "the models must share one architecture")
