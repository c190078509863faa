"""``Collective``: the torch.distributed calls of a partition (sum statistics, broadcast scores).

Outside ``torch.distributed`` (or with a world of one) every call is a no-op,
so the partition stages never branch on whether they run distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Collective"]


@dataclass(frozen=True)
class Collective:
    """The process group of one call: ``active`` (world > 1), ``world_size``, ``src``
    (the global rank of the group's rank 0) and ``group`` (``None`` = the world)."""

    active: bool = False
    world_size: int = 1
    src: int = 0
    group: Any = None

    @classmethod
    def of(cls, process_group=None) -> "Collective":
        """The group ``process_group`` (default: the world) if ``torch.distributed`` is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(group=process_group)
        world = dist.get_world_size(process_group)
        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        return cls(world > 1, world, src, process_group)

    def sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """All-reduce (sum) a list of tensors as one flat buffer (identity when inactive)."""
        return self._flat(tensors, "sum") if self.active else tensors

    def broadcast(self, tensors: list[Tensor]) -> list[Tensor]:
        """Rank ``src``'s values of a list of tensors, everywhere (identity when inactive)."""
        return self._flat(tensors, "broadcast") if self.active else tensors

    def _flat(self, tensors: list[Tensor], op: str) -> list[Tensor]:
        if not tensors:
            return tensors
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        if op == "sum":
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        else:
            dist.broadcast(flat, src=self.src, group=self.group)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start: start + t.numel()].reshape(t.shape).to(t.dtype))
            start += t.numel()
        return out
