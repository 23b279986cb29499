"""Weights that accelerate offloads (CPU/disk device maps) are ``meta`` outside forward; these
helpers materialise them one module at a time, so nothing ever holds an offloaded model whole."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate keeps this module's own weights off-device (``meta`` outside forward)."""
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:
        return False
    return has_offloaded_params(module)


@contextlib.contextmanager
def real_weight(module: nn.Module) -> Iterator[torch.Tensor]:
    """``module.weight`` as a real tensor for the duration of the block (offloaded ones loaded once)."""
    if is_offloaded(module):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield module.weight
    else:
        yield module.weight


def named_real_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` (same names, order and de-duplication) with offloaded weights
    materialised one module at a time, so a disk-offloaded model never sits in memory whole."""
    from accelerate.utils import align_module_device

    wanted = {n for n, _ in model.named_parameters()}
    for mod_name, mod in model.named_modules():
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        ctx = align_module_device(mod) if is_offloaded(mod) else contextlib.nullcontext()
        with ctx:
            for name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{name}" if mod_name else name
                if full in wanted:
                    yield full, p
