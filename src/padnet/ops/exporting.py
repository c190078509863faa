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


def _onnx_export_probe():
    """A cheap ``() -> bool`` for "an ONNX export is running".

    ``torch.onnx.is_in_onnx_export`` re-imports two modules on every call
    (~7 us, more than a small conv's routing); the flags it reads are looked up
    once here. Falls back to the public function if torch moves them.
    """
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        if isinstance(GLOBALS.in_onnx_export, bool) and isinstance(_flags._is_onnx_exporting, bool):
            return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting
    except (ImportError, AttributeError):
        pass
    return torch.onnx.is_in_onnx_export


_in_onnx_export = None


def is_exporting() -> bool:
    """True inside :func:`export_mode`, torch.export / dynamo tracing, ONNX export or JIT tracing."""
    global _in_onnx_export
    if _EXPORT_DEPTH > 0 or torch.compiler.is_compiling():  # is_compiling: also true under torch.export
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if _in_onnx_export is None:
        _in_onnx_export = _onnx_export_probe()
    return bool(_in_onnx_export())


__all__ = ["export_mode", "is_exporting"]
