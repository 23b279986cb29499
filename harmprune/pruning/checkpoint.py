"""Files in and out of the pruner: score directories, masks and the atomic checkpoint write."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core import manifest
from ..core.errors import HarmpruneError
from ..attribution.artifact import Scores, load_scores  # noqa: F401 - re-exported for the pruner

MASK_FILE = "mask.safetensors"
CONFIG_FILE = "prune_config.json"


def save_mask(path: str | os.PathLike, mask: dict[str, torch.Tensor]) -> None:
    """Write a bool mask; only matrices with at least one selected entry are kept."""
    from safetensors.torch import save_file

    keep = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in mask.items() if bool(torch.count_nonzero(m))}
    save_file(keep, str(path), metadata={"format": "harmprune-mask"})


def load_mask(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a mask file (or the ``mask.safetensors`` inside a checkpoint directory)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / MASK_FILE
    if not p.is_file():
        raise HarmpruneError(f"mask file {p} not found")
    try:
        mask = load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise HarmpruneError(f"cannot read mask {p}: {str(e).splitlines()[0]}") from None
    bad = [n for n, m in mask.items() if m.dtype != torch.bool]
    if bad:
        raise HarmpruneError(f"{p}: {bad[0]} is {mask[bad[0]].dtype}, a mask must be bool")
    return mask


def original_tokenizer(spec: str):
    """The tokenizer exactly as the model ships it (load_tokenizer may add a pad token for batching)."""
    from transformers import AutoTokenizer

    from ..core.models import resolve

    path, gguf = resolve(spec)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)


def save_checkpoint(out: str | os.PathLike, model, tokenizer, mask: dict[str, torch.Tensor], config: dict,
                    overwrite: bool = False) -> Path:
    """Write an HF checkpoint + ``mask.safetensors`` + ``prune_config.json`` atomically.

    Everything goes to a temporary sibling that is renamed to ``out`` only when complete, so an
    exception or interrupt leaves neither a partial ``out`` nor the temporary directory. The mask's
    sha256 is added to ``config`` as ``mask_sha256``.
    """
    with manifest.atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_mask(tmp / MASK_FILE, mask)
        config = {**config, "mask_sha256": manifest.sha256_file(tmp / MASK_FILE)}
        manifest.write_json(tmp / CONFIG_FILE, config)
    return Path(out)
