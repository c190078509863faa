"""Functional dynamic convolution: ``y_b = conv(x_b, sum_k pi_bk dyn_k + sta) + bias_b``.

Both the trainable :class:`~padnet.layers.DynamicConv2d` and its deploy form
call :func:`dynamic_conv2d` with already combined factors (mask and scales
folded in), so every backend is written once.

Backends:
- ``"weight"``: aggregate one kernel per sample, then one grouped convolution
  with ``groups = B * groups`` (the classic DY-Conv / CondConv implementation).
- ``"output"``: run the K dynamic kernels and the static kernel as one static
  convolution with ``(K + 1) * O`` output channels, then mix the K outputs with
  the routing weights. Linear in the kernel, so exactly the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "weight", "output")


def select_backend(
    backend: str, batch_size: int, num_kernels: int, out_channels: int, groups: int
) -> str:
    """Resolve ``"auto"`` to a concrete backend by a simple cost rule.

    The output-space path costs ``K + 1`` static convolutions but runs as one
    large, well-vectorised convolution; the weight-space path costs one
    convolution per sample but with ``groups = B``, which CPU kernels run poorly
    for large B. Depthwise layers are cheap either way; keep weight space.
    """
    if backend != "auto":
        return backend
    if batch_size == 1:
        return "weight"
    if groups > 1 and groups == out_channels:
        return "weight"
    return "output"


def mix_bias(pi: Tensor, bias_dyn: Tensor | None, bias_sta: Tensor | None) -> Tensor | None:
    """Per-sample bias ``[B, O]`` = ``pi @ bias_dyn + bias_sta``, or ``None``."""
    if bias_dyn is None:
        return None
    return pi @ bias_dyn + bias_sta


def dynamic_conv2d(
    x: Tensor,
    pi: Tensor,
    dyn: Tensor,
    sta: Tensor,
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
        sta: ``[O, C/groups, kh, kw]`` combined static part.
        bias_dyn: ``[K, O]`` or ``None``; bias_sta: ``[O]`` or ``None``.
    Returns:
        ``[B, O, H', W']``.
    """
    batch = x.shape[0]
    k, out_channels = dyn.shape[0], dyn.shape[1]
    backend = select_backend(backend, batch, k, out_channels, groups)
    bias = mix_bias(pi, bias_dyn, bias_sta)
    if backend == "weight":
        y = _weight_space(x, pi, dyn, sta, stride, padding, dilation, groups)
    elif backend == "output":
        y = _output_space(x, pi, dyn, sta, stride, padding, dilation, groups)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if bias is not None:
        y = y + bias[:, :, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def _weight_space(x, pi, dyn, sta, stride, padding, dilation, groups):
    batch, channels, height, width = x.shape
    k = dyn.shape[0]
    kernel_shape = dyn.shape[1:]
    weight = (pi @ dyn.reshape(k, -1)).reshape(batch, *kernel_shape) + sta
    weight = weight.reshape(batch * kernel_shape[0], *kernel_shape[1:])
    y = F.conv2d(
        x.reshape(1, batch * channels, height, width), weight, None, stride, padding, dilation, batch * groups
    )
    return y.reshape(batch, kernel_shape[0], *y.shape[-2:])


def _output_space(x, pi, dyn, sta, stride, padding, dilation, groups):
    k, out_channels = dyn.shape[0], dyn.shape[1]
    if groups == 1:
        weight = torch.cat([dyn.reshape(k * out_channels, *dyn.shape[2:]), sta], dim=0)
    else:
        # Keep each group's K+1 kernels contiguous so one grouped conv serves all.
        per_group = out_channels // groups
        parts = torch.cat([dyn, sta.unsqueeze(0)], dim=0)  # [K+1, O, ...]
        parts = parts.reshape(k + 1, groups, per_group, *dyn.shape[2:]).transpose(0, 1)
        weight = parts.reshape(groups * (k + 1) * per_group, *dyn.shape[2:])
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    batch, _, height, width = y.shape
    if groups == 1:
        y = y.reshape(batch, k + 1, out_channels, height, width)
    else:
        y = y.reshape(batch, groups, k + 1, out_channels // groups, height, width).transpose(1, 2)
        y = y.reshape(batch, k + 1, out_channels, height, width)
    mixed = torch.einsum("bk,bkohw->bohw", pi, y[:, :k])
    return mixed + y[:, k]
