"""Dropless mixture-of-experts dispatch: routed tokens through per-expert FFN weights.

An expert is either a plain FFN ``act(x W_in^T + b_in) W_out^T + b_out`` or a
gated one (GLU / SwiGLU / GeGLU) ``(act(x W_gate^T + b_gate) * (x W_in^T + b_in)) W_out^T + b_out``,
where ``W_in`` is then the *up* projection. Shapes: ``x`` ``[N, H]``,
``W_in`` / ``W_gate`` ``[E, I, H]``, ``W_out`` ``[E, H, I]``, biases ``[E, I]`` / ``[E, H]``.

Two implementations, same numbers up to float rounding:

- ``"sorted"`` (eager): (token, slot) pairs sorted by expert, one loop over
  experts with contiguous GEMMs per expert (one host sync for the counts);
- ``"dense"`` (export): every expert on every token, gated with the sparse
  top-k gates: ``E / k`` times the FLOPs but no data-dependent shapes, so it
  exports (torch.export, ONNX) with a dynamic token axis.

``"auto"`` (the default) picks ``"dense"`` whenever
:func:`padnet.ops.exporting.is_exporting` is true -- torch.export, ONNX export,
JIT tracing and also ``torch.compile`` (data-dependent shapes would break the
graph there) -- and ``"sorted"`` otherwise. Pass ``impl="sorted"`` to keep the
sparse path under ``torch.compile`` at the cost of a graph break.
:data:`DISPATCH_IMPLS` lists ``"auto"`` and the two concrete paths
(:data:`CONCRETE_DISPATCH_IMPLS`). :mod:`padnet.layers.moe` re-exports this function.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .exporting import is_exporting

__all__ = ["CONCRETE_DISPATCH_IMPLS", "DISPATCH_IMPLS", "moe_dispatch"]

CONCRETE_DISPATCH_IMPLS = ("sorted", "dense")
DISPATCH_IMPLS = ("auto",) + CONCRETE_DISPATCH_IMPLS


def _hidden(xe: Tensor, w_in: Tensor, b_in: Tensor | None, w_gate: Tensor | None, b_gate: Tensor | None,
            activation: Callable[[Tensor], Tensor]) -> Tensor:
    """One expert's hidden activations ``[n, I]`` (plain or gated)."""
    up = F.linear(xe, w_in, b_in)
    if w_gate is None:
        return activation(up)
    return activation(F.linear(xe, w_gate, b_gate)) * up


def moe_dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_gates: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: Callable[[Tensor], Tensor],
    counts: Tensor | None = None,
    impl: str = "auto",
    *,
    w_gate: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """Dropless dispatch of routed tokens through effective expert weights.

    Args:
        x: ``[N, H]`` tokens.
        topk_idx: ``[N, k]`` expert ids.
        topk_gates: ``[N, k]`` gate values.
        w_in: ``[E, I, H]`` input (up) projections; ``b_in``: ``[E, I]`` or None.
        w_out: ``[E, H, I]`` output (down) projections; ``b_out``: ``[E, H]`` or None.
        activation: elementwise callable.
        counts: optional precomputed ``bincount(topk_idx, minlength=E)``.
        impl: ``"sorted"``, ``"dense"`` (see the module docstring) or ``"auto"``: ``"dense"`` (the export
            path) while exporting, tracing or compiling (:func:`padnet.ops.exporting.is_exporting`), else
            ``"sorted"``.
        w_gate: ``[E, I, H]`` gate projections of gated experts (``None``: plain FFN experts);
            ``b_gate``: ``[E, I]`` or None.

    Returns:
        ``[N, H]``: ``sum_j gate[n, j] * FFN_{idx[n, j]}(x[n])``, in ``x.dtype``
        (the gate-weighted sum accumulates in at least float32).

    ``"sorted"``: the (token, slot) pairs are stably sorted by expert id; each
    expert runs its GEMMs (bias fused) on its contiguous slice -- one Python
    loop over experts, never over tokens. Slot outputs are un-permuted with one
    gather and combined per token as ``sum_j gate * y`` (no scatter-add).
    Without autograd the expert outputs are written straight into one
    preallocated buffer.
    """
    if impl not in DISPATCH_IMPLS:
        raise ValueError(f"unknown MoE dispatch impl {impl!r}; expected one of {DISPATCH_IMPLS}")
    if impl == "auto":
        impl = "dense" if is_exporting() else "sorted"
    if w_gate is None and b_gate is not None:
        raise ValueError("b_gate given without w_gate")
    if w_gate is not None and w_gate.shape != w_in.shape:
        raise ValueError(f"w_gate has shape {tuple(w_gate.shape)}, expected w_in's {tuple(w_in.shape)}")
    if impl == "dense":
        return _dense_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation, w_gate, b_gate)
    n, _ = x.shape
    num_experts = w_in.shape[0]
    k = topk_idx.shape[1]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    if n == 0:
        return torch.zeros(n, w_out.shape[1], device=x.device, dtype=x.dtype)
    flat_expert = topk_idx.reshape(-1)
    if counts is None:
        counts = torch.bincount(flat_expert, minlength=num_experts)
    order = torch.argsort(flat_expert, stable=True)
    x_sorted = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, topk_gates, w_in, b_in, w_out, b_out, w_gate, b_gate)
    )
    out_features = w_out.shape[1]
    y_sorted = None if track else x.new_empty(n * k, out_features)
    pieces = []
    start = 0
    for e, c in enumerate(counts.tolist()):  # one host sync; loop over experts only
        if c == 0:
            continue
        xe = x_sorted[start : start + c]
        hidden = _hidden(xe, w_in[e], None if b_in is None else b_in[e],
                         None if w_gate is None else w_gate[e], None if b_gate is None else b_gate[e], activation)
        if track:
            pieces.append(F.linear(hidden, w_out[e], None if b_out is None else b_out[e]))
        elif b_out is None:
            torch.mm(hidden, w_out[e].t(), out=y_sorted[start : start + c])
        else:
            torch.addmm(b_out[e], hidden, w_out[e].t(), out=y_sorted[start : start + c])
        start += c
    if track:
        y_sorted = torch.cat(pieces, dim=0)
    # un-permute: slot j of token t sits at position inverse[t * k + j]
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    y_slots = y_sorted.index_select(0, inverse).view(n, k, out_features)
    gates = topk_gates.to(acc_dtype).unsqueeze(1)  # [N, 1, k]
    if y_slots.dtype == acc_dtype:
        out = torch.bmm(gates, y_slots).squeeze(1)
    else:
        out = torch.bmm(gates, y_slots.to(acc_dtype)).squeeze(1)
    return out.to(x.dtype)


def _dense_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation, w_gate, b_gate) -> Tensor:
    """All experts on all tokens, gated by the (sparse) top-k gates: export-friendly, E/k x FLOPs."""
    num_experts = w_in.shape[0]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    gates = torch.zeros(x.shape[0], num_experts, device=x.device, dtype=acc_dtype)
    gates = gates.scatter(1, topk_idx, topk_gates.to(acc_dtype))  # [N, E], zero for unchosen experts
    hidden = torch.matmul(x.unsqueeze(0), w_in.transpose(1, 2))  # [E, N, I]
    if b_in is not None:
        hidden = hidden + b_in.unsqueeze(1)
    if w_gate is None:
        hidden = activation(hidden)
    else:
        g = torch.matmul(x.unsqueeze(0), w_gate.transpose(1, 2))
        if b_gate is not None:
            g = g + b_gate.unsqueeze(1)
        hidden = activation(g) * hidden
    y = torch.matmul(hidden, w_out.transpose(1, 2))  # [E, N, H]
    if b_out is not None:
        y = y + b_out.unsqueeze(1)
    out = torch.einsum("ne,enh->nh", gates, y.to(acc_dtype))
    return out.to(x.dtype)
