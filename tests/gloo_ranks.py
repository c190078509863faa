"""Test helper: run a function on N local gloo ranks and collect what each rank returns.

``run_on_gloo_ranks(fn, world, tmp_dir)`` spawns ``world`` processes; each sets
up the default process group (gloo, 127.0.0.1, a free port), calls ``fn(rank)``
with one torch thread, saves the result under ``tmp_dir`` and tears the group
down. ``fn`` must be a module-level function (spawned processes import it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[[int], Any], world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn: Callable[[int], Any], world: int, tmp_dir: Path) -> list[Any]:
    """``[fn(0), ..., fn(world - 1)]``, each computed on its own gloo rank (skips without torch.distributed)."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_rank_main, args=(fn, world, _free_port(), str(tmp_dir)), nprocs=world, join=True)
    return [torch.load(Path(tmp_dir) / f"rank{r}.pt") for r in range(world)]
