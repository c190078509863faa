"""Functional dynamic convolution: ``y_b = conv(x_b, sum_k pi_bk dyn_k + sta) + bias_b``.

Both :class:`~padnet.layers.DynamicConv2d` and its deploy form call
:func:`dynamic_conv2d` with already combined factors (mask and scales folded
in), so every backend (:mod:`.conv_backends`) is written once. ``sta`` may be
``None`` (no static part: a fully dynamic layer, or the dynamic rows of a
channel split). The backend is chosen by :func:`.backend_selection.resolve_backend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend_selection import conv_geometry, resolve_backend, resolve_single_sample_backend
from .conv_backends import run_backend
from .exporting import is_exporting


def mix_bias(pi: Tensor, bias_dyn: Tensor | None, bias_sta: Tensor | None) -> Tensor | None:
    """Per-sample bias ``[B, O]`` = ``pi [B, K] @ bias_dyn [K, O] + bias_sta [O]``, or ``None``."""
    if bias_dyn is None:
        return bias_sta if bias_sta is None else bias_sta.expand(pi.shape[0], -1)
    if bias_sta is None:
        return pi @ bias_dyn
    return torch.addmm(bias_sta, pi, bias_dyn)


def add_channel_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """``y [B, O, H, W]`` plus a ``[O]`` or per-sample ``[B, O]`` bias (``None``: ``y`` itself)."""
    if bias is None:
        return y
    return y + (bias[:, None, None] if bias.dim() == 1 else bias[:, :, None, None])


def single_sample_conv(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, bias_dyn: Tensor | None,
                       bias_sta: Tensor | None, stride, padding, dilation, groups: int,
                       backend: str = "weight") -> Tensor:
    """:func:`dynamic_conv2d` of one sample (``x [1, C, H, W]``, ``pi [1, K]``): its aggregated kernel is a
    plain conv weight, its mixed bias a plain conv bias. Not for export (use :func:`dynamic_conv2d`).

    ``backend="weight"``: the kernel is one GEMM into a fresh tensor, then one conv. (A reused workspace,
    as the batched backends use for their ``B`` kernels, measured slower here: one kernel is at most a few
    MiB, which malloc serves from its heap once it has been freed before, and the workspace's per-call
    bookkeeping cost more than that.) ``backend="fused"``: the C++ kernel of :mod:`.fused`, which never
    writes the aggregated kernel (inference only); ``backend="bmm"``: the per-sample GEMM backend (at batch 1
    one tile: the kernel mixed into a reused workspace, im2col, one BLAS GEMM) (both chosen by
    :func:`.backend_selection.resolve_single_sample_backend`).
    """
    bias = mix_bias(pi, bias_dyn, bias_sta)
    if backend in ("fused", "bmm"):
        y = run_backend(backend, x, pi, dyn, sta, conv_geometry(dyn.shape[-2:], stride, padding, dilation, groups),
                        padding)
        y = add_channel_bias(y, None if bias is None else bias[0])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)  # as F.conv2d returns it
        return y
    if backend != "weight":
        raise ValueError(f"single_sample_conv: backend must be 'weight', 'fused' or 'bmm', got {backend!r}")
    k = dyn.shape[0]
    weight = torch.mm(pi, dyn.reshape(k, -1)) if sta is None else torch.addmm(sta.reshape(-1), pi, dyn.reshape(k, -1))
    return F.conv2d(x, weight.view(dyn.shape[1:]), None if bias is None else bias[0], stride, padding, dilation,
                    groups)


def dynamic_conv2d(
    x: Tensor,
    pi: Tensor,
    dyn: Tensor,
    sta: Tensor | None,
    bias_dyn: Tensor | None = None,
    bias_sta: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Dynamic convolution with per-sample kernels.

    Args:
        x: ``[B, C, H, W]`` input.
        pi: ``[B, K]`` routing weights.
        dyn: ``[K, O, C/groups, kh, kw]`` combined dynamic factors.
        sta: ``[O, C/groups, kh, kw]`` combined static part, or ``None`` (zero).
        bias_dyn: ``[K, O]`` or ``None``; bias_sta: ``[O]`` or ``None``.
        backend: ``"auto"``, ``"weight"``, ``"bmm"`` or ``"output"``.
    Returns:
        ``[B, O, H', W']`` (channels_last if ``x`` is).
    """
    if x.shape[0] == 1 and backend in ("auto", "weight") and not is_exporting():
        single = "weight"
        if backend == "auto" and not torch.is_grad_enabled():  # (layers keep this decision per input shape)
            single = resolve_single_sample_backend(x, pi, dyn, sta, stride, padding, dilation, groups,
                                                   bias=bias_dyn is not None or bias_sta is not None)
        return single_sample_conv(x, pi, dyn, sta, bias_dyn, bias_sta, stride, padding, dilation, groups, single)
    geom = conv_geometry(dyn.shape[-2:], stride, padding, dilation, groups)
    name = resolve_backend(x, pi, dyn, sta, stride, padding, dilation, groups, backend, geom=geom)
    y = run_backend(name, x, pi, dyn, sta, geom, padding)
    if bias_dyn is not None:
        y = y + mix_bias(pi, bias_dyn, bias_sta)[:, :, None, None]
    elif bias_sta is not None:
        y = y + bias_sta[:, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


__all__ = ["add_channel_bias", "dynamic_conv2d", "mix_bias", "single_sample_conv"]
