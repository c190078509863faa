"""The one place that knows whether a model is being exported or traced.

Every padnet op that must behave differently while a graph is captured
(torch.export, dynamo / torch.compile, ONNX export, TorchScript tracing) asks
:func:`is_exporting`; :func:`export_mode` forces the same behaviour in eager
mode (padnet's exporters enter it, tests use it to check the export paths).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_EXPORT_DEPTH = 0


@contextmanager
def export_mode() -> Iterator[None]:
    """Within this context every padnet layer uses its export-friendly path.

    Dynamic convs avoid batch-dependent attributes (``groups = B``), Python
    loops over samples, ``out=`` buffers and timing (backend choice is the
    deterministic rule); MoE dispatch computes all experts densely and gates
    with the top-k mask (no data-dependent shapes).
    """
    global _EXPORT_DEPTH
    _EXPORT_DEPTH += 1
    try:
        yield
    finally:
        _EXPORT_DEPTH -= 1


def is_exporting() -> bool:
    """True inside :func:`export_mode`, torch.export / dynamo tracing, ONNX export or JIT tracing."""
    if _EXPORT_DEPTH > 0:
        return True
    if torch.compiler.is_compiling():  # also true under torch.export
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return bool(torch.onnx.is_in_onnx_export())


__all__ = ["export_mode", "is_exporting"]
