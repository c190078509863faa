"""Per-thread scratch buffers reused across calls (CPU).

Freshly allocated temporaries of several MiB are served by glibc's ``mmap``
and page-faulted in again on every call, so a conv's time then depends on the
process's malloc state (measured: the same static conv 12.8 ms in one process,
21.3 ms in another). The tiled backends take their tile buffers from here
instead: allocated once per (thread, slot, dtype), grown when needed, reused.
Buffers above :data:`WORKSPACE_LIMIT` bytes (``PADNET_WORKSPACE_MB``, default
192) and non-CPU tensors are allocated per call.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor


def _limit_from_env() -> int:
    raw = os.environ.get("PADNET_WORKSPACE_MB", "192")
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"PADNET_WORKSPACE_MB must be an integer number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"PADNET_WORKSPACE_MB must be >= 0, got {mb}")
    return mb << 20


WORKSPACE_LIMIT = _limit_from_env()
_LOCAL = threading.local()


def workspace(slot: int, numel: int, like: Tensor) -> Tensor:
    """A flat scratch tensor of ``numel`` elements (dtype/device of ``like``), valid until the slot's next use."""
    if numel * like.element_size() > WORKSPACE_LIMIT or like.device.type != "cpu":
        return like.new_empty(numel)
    store = getattr(_LOCAL, "buffers", None)
    if store is None:
        store = _LOCAL.buffers = {}
    key = (slot, like.dtype)
    buf = store.get(key)
    # a buffer first made under torch.inference_mode is an inference tensor, which may not be written
    # outside that mode: replace it then
    if buf is None or buf.numel() < numel or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = like.new_empty(numel)
        store[key] = buf
    return buf[:numel]


__all__ = ["WORKSPACE_LIMIT", "workspace"]
