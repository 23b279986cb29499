"""Data-parallel scoring on accelerate / torch.distributed: shard the records, sum once, launch.

Two ways in, one code path. Under ``accelerate launch`` (or torchrun) the environment already
holds RANK/WORLD_SIZE/MASTER_ADDR and ``setup`` joins the process group through
``accelerate.PartialState`` (gloo on CPU, nccl on CUDA). ``launch`` (behind ``harmprune score
--num-processes N``) starts N local processes with ``torch.multiprocessing``, gives each the
environment ``accelerate launch`` would, and they take that same path.

Every score statistic is a sum over samples (snip: Σ δᵀX, snip-abs: Σ |δ_xᵀX_x|, wanda: Σ X²), so
each process sums its own shard and one all-reduce of the raw sums before ``formulas.finalize``
gives the single-process result up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import HarmpruneError
from ..core.models import resolve_device


@dataclass(frozen=True)
class Process:
    """This process's place in the run: ``rank`` of ``world``; rank 0 writes the output."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def env_world_size() -> int:
    """The WORLD_SIZE a launcher (accelerate launch, torchrun, ``launch``) put in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device: str = "cpu") -> Process:
    """Join the launcher's process group (once) and return this process's rank; ``Process()`` alone."""
    device = resolve_device(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Process(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", 0)))
    if env_world_size() <= 1:
        return Process()
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1 or not torch.distributed.is_initialized():
        raise HarmpruneError(f"WORLD_SIZE={env_world_size()} is set but accelerate started no process group "
                             f"(backend {state.backend}); launch with accelerate launch or --num-processes")
    return Process(state.process_index, state.num_processes, state.local_process_index)


def process_device(device: str, proc: Process) -> str:
    """Each process of a multi-GPU run gets its own GPU: plain ``cuda`` becomes ``cuda:<local rank>``."""
    device = resolve_device(device)
    return f"cuda:{proc.local_rank}" if proc.world > 1 and device == "cuda" else device


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_(t: torch.Tensor, dev: torch.device) -> None:
    if t.device == dev:
        torch.distributed.all_reduce(t)
        return
    tmp = t.to(dev)  # e.g. CPU accumulators of offloaded layers under nccl: one layer at a time
    torch.distributed.all_reduce(tmp)
    t.copy_(tmp)


def all_reduce_run(accumulators: dict[str, torch.Tensor], counts: dict[str, float]) -> dict[str, float]:
    """The engine's ``reduce``: sum raw accumulators (in place) and counts over all processes, once."""
    dev = _comm_device()
    for name in sorted(accumulators):  # the same order on every rank
        _sum_(accumulators[name], dev)
    keys = sorted(counts)
    vec = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def _worker(local_rank: int, fn: Callable, args: tuple) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        fn(*args)
    except HarmpruneError as e:
        raise SystemExit(f"harmprune: error (process {local_rank}): {e}") from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch(num_processes: int, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` in ``num_processes`` local processes that form one process group.

    Each gets the environment ``accelerate launch`` sets (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, a free MASTER_PORT), so ``fn`` takes the same ``setup`` path as under it. A failed
    process stops the others and raises HarmpruneError here.
    """
    import torch.multiprocessing as mp
    from accelerate.utils import patch_environment
    from accelerate.utils.other import get_free_port

    env = {"master_addr": "127.0.0.1", "master_port": str(get_free_port()), "world_size": str(num_processes),
           "local_world_size": str(num_processes)}
    try:
        with patch_environment(**env):
            mp.start_processes(_worker, args=(fn, args), nprocs=num_processes, start_method="spawn", join=True)
    except mp.ProcessExitedException as e:
        raise HarmpruneError(f"process {e.error_index} of {num_processes} failed (exit code {e.exit_code}); "
                             "its error is printed above") from None
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        raise HarmpruneError(f"process {e.error_index} of {num_processes} failed: {last}") from None
