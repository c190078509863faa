"""Multi-process training helpers: torchrun environment, local spawning, collectives.

``torchrun --nproc-per-node N -m padnet train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``padnet train --nproc N``
spawns N local processes with the same variables (:func:`spawn`). Either way
:func:`setup` initialises the default process group: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    return device


def setup(device_name: str = "auto") -> DistContext:
    """Read the torchrun environment; initialise the process group when WORLD_SIZE > 1."""
    world = env_world_size()
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name, local_rank)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        initialized_here = True
    return DistContext(rank, world, local_rank, device, initialized_here)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sums(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a list of numbers over all ranks (float64)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(ctx: DistContext, module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (masks included) to every rank."""
    if not ctx.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    if not ctx.active:
        return
    with torch.no_grad():
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A spawned training process failed; the message is that process's error."""


def _worker(local_rank: int, fn: Callable, payload: bytes, world: int, port: int, threads: int) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    })
    torch.set_num_threads(threads)
    fn(*pickle.loads(payload))


def spawn(fn: Callable, args: tuple, nproc: int) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes forming one process group.

    CPU threads are split evenly between the processes. A failing process
    raises :class:`WorkerError` carrying its last error line.
    """
    import torch.multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // nproc)
    payload = pickle.dumps(args)
    try:
        mp.start_processes(_worker, args=(fn, payload, nproc, free_port(), threads), nprocs=nproc,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise WorkerError(f"training process failed: {lines[-1] if lines else exc}") from None
    except mp.ProcessExitedException as exc:
        raise WorkerError(f"training process exited abnormally: {exc}") from None
