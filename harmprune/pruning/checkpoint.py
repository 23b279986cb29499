"""Files in and out of the pruner: score directories, masks and the atomic checkpoint write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core import manifest, stfile
from ..core.errors import HarmpruneError
from ..attribution.artifact import Scores, load_scores  # noqa: F401 - re-exported for the pruner

MASK_FILE = "mask.safetensors"
CONFIG_FILE = "prune_config.json"


MASK_FORMAT = "harmprune-mask-indices"  # compact; "harmprune-mask" (dense bool) is still read


def save_mask(path: str | os.PathLike, mask: dict[str, torch.Tensor]) -> None:
    """Write a bool mask compactly; only matrices with at least one selected entry are kept.

    Format (still safetensors, byte-reproducible): per matrix a 1-D tensor of the sorted flat
    (row-major) indices of its True entries, int32 (int64 for matrices of 2^31 entries or more);
    metadata ``format`` = ``harmprune-mask-indices`` and ``shapes`` = JSON ``{name: shape}``. A few
    thousand pruned weights take kilobytes instead of one byte per weight of every touched matrix.
    """
    idx, shapes = {}, {}
    for n, m in mask.items():
        flat = m.detach().to("cpu", torch.bool).reshape(-1)
        nz = torch.nonzero(flat).reshape(-1)
        if nz.numel():
            idx[n] = nz.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
            shapes[n] = list(m.shape)
    stfile.write(path, idx, {"format": MASK_FORMAT, "shapes": json.dumps(shapes, sort_keys=True)})


def _mask_fix(p: Path) -> str:
    return f"re-create it with `harmprune prune` (or delete {p.parent} and re-run)"


def _dense_from_indices(p: Path, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    try:
        shapes = json.loads(meta.get("shapes", ""))
    except json.JSONDecodeError:
        raise HarmpruneError(f"{p}: mask metadata 'shapes' is not JSON; {_mask_fix(p)}") from None
    out = {}
    for n, ix in tensors.items():
        if n not in shapes or ix.dtype not in (torch.int32, torch.int64) or ix.dim() != 1:
            raise HarmpruneError(f"{p}: {n} is not a list of flat indices with a shape in the metadata; {_mask_fix(p)}")
        m = torch.zeros(int(torch.Size(shapes[n]).numel()), dtype=torch.bool)
        if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= m.numel()):
            raise HarmpruneError(f"{p}: {n} has indices outside its shape {shapes[n]}; {_mask_fix(p)}")
        m[ix.long()] = True
        out[n] = m.reshape(shapes[n])
    return out


def load_mask(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a mask file (or the ``mask.safetensors`` inside a checkpoint directory) as bool tensors.

    Reads the compact index format and the dense bool format of earlier versions; a corrupt or
    cut-short file ends in one line naming it and what to do.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MASK_FILE
    if not p.is_file():
        raise HarmpruneError(f"mask file {p} not found")
    meta = stfile.metadata(p, "the mask", _mask_fix(p))
    tensors = stfile.load(p, "the mask", _mask_fix(p))
    if meta.get("format") == MASK_FORMAT:
        return _dense_from_indices(p, tensors, meta)
    bad = [n for n, m in tensors.items() if m.dtype != torch.bool]
    if bad:
        raise HarmpruneError(f"{p}: {bad[0]} is {tensors[bad[0]].dtype}, a mask must be bool")
    return tensors


def original_tokenizer(spec: str):
    """The tokenizer exactly as the model ships it (``load_tokenizer`` without the batching pad token)."""
    from ..core.models import load_tokenizer

    return load_tokenizer(spec, pad=False)


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
