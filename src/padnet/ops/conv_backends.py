"""The concrete dynamic-conv backends. All compute ``y_b = conv(x_b, pi_b @ dyn + sta)``.

- ``"weight"``: aggregate one kernel per sample, then one grouped convolution
  with ``groups = B * groups`` (the classic DY-Conv / CondConv implementation,
  the peer baseline and the algorithmic form FLOP counting uses).
- ``"bmm"``: weight space as cache-tiled batched GEMM (:mod:`.bmm_kernels`,
  with the tiled backward of :mod:`.bmm_autograd`).
- ``"output"``: the K dynamic kernels and the static kernel as one static
  convolution with ``(K + 1) * O`` output channels, then the K outputs mixed
  with the routing weights: ``K + 1`` times the FLOPs in one large conv.

Shapes everywhere: ``x [B, C, H, W]``, ``pi [B, K]``, ``dyn [K, O, C/groups, kh, kw]``,
``sta [O, C/groups, kh, kw]`` or ``None``; result ``[B, O, H', W']`` (no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bmm_autograd import WeightSpaceBMM
from .bmm_kernels import aggregate_kernels, bmm_plain, bmm_tiled_forward
from .exporting import is_exporting
from .geometry import ConvGeometry
from .workspace import workspace

CONCRETE_BACKENDS = ("weight", "bmm", "output")


def weight_space(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry, padding) -> Tensor:
    """Per-sample kernels, then one grouped conv with ``groups = B * groups``."""
    batch, channels, height, width = x.shape
    kernel_shape = dyn.shape[1:]
    weight = aggregate_into_workspace(pi, dyn, sta, x)
    if weight is None:
        weight = aggregate_kernels(pi, dyn, sta)
    weight = weight.reshape(batch * kernel_shape[0], *kernel_shape[1:])
    y = F.conv2d(x.reshape(1, batch * channels, height, width), weight, None, geom.stride, padding, geom.dilation,
                 batch * geom.groups)
    return y.reshape(batch, kernel_shape[0], *y.shape[-2:])


def aggregate_into_workspace(pi: Tensor, dyn: Tensor, sta: Tensor | None, x: Tensor) -> Tensor | None:
    """Per-sample kernels ``[B, P]`` written into a reused workspace (no autograd, CPU, one dtype), else ``None``.

    ``B`` kernels are the largest temporary of the grouped-conv backend (4.7 MiB at
    64@32, batch 32); a fresh buffer that size is page-faulted in on every call.
    """
    if (torch.is_grad_enabled() and (x.requires_grad or pi.requires_grad or dyn.requires_grad
                                     or (sta is not None and sta.requires_grad))) or is_exporting():
        return None  # (the conv saves its weight for the input gradient too: x counts)
    if x.device.type != "cpu" or not (pi.dtype == dyn.dtype == x.dtype):
        return None
    k = dyn.shape[0]
    flat = dyn.reshape(k, -1)
    out = workspace(4, pi.shape[0] * flat.shape[1], x).view(pi.shape[0], flat.shape[1])
    if sta is None:
        return torch.mm(pi, flat, out=out)
    return torch.addmm(sta.reshape(-1), pi, flat, out=out)


def output_space(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry, padding) -> Tensor:
    """One static conv with ``(K [+1]) * O`` outputs, then the K outputs mixed with ``pi``."""
    k, out_channels = dyn.shape[0], dyn.shape[1]
    groups = geom.groups
    parts = k + (0 if sta is None else 1)
    if groups == 1:
        weight = dyn.reshape(k * out_channels, *dyn.shape[2:])
        if sta is not None:
            weight = torch.cat([weight, sta], dim=0)
    else:
        # Keep each group's K(+1) kernels contiguous so one grouped conv serves all.
        per_group = out_channels // groups
        stack = dyn if sta is None else torch.cat([dyn, sta.unsqueeze(0)], dim=0)  # [parts, O, ...]
        stack = stack.reshape(parts, groups, per_group, *dyn.shape[2:]).transpose(0, 1)
        weight = stack.reshape(groups * parts * per_group, *dyn.shape[2:])
    y = F.conv2d(x, weight, None, geom.stride, padding, geom.dilation, groups)
    if groups == 1:
        y = y.unflatten(1, (parts, out_channels))
    else:
        y = y.unflatten(1, (groups, parts, out_channels // groups)).transpose(1, 2).flatten(2, 3)
    mixed = torch.einsum("bk,bkohw->bohw", pi, y[:, :k])
    return mixed if sta is None else mixed + y[:, k]


def weight_space_bmm(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry,
                     padding=None) -> Tensor:
    """Tiled GEMM (custom backward with autograd); untiled when exporting or for grouped convs."""
    if geom.groups > 1 or is_exporting():
        return bmm_plain(x, pi, dyn, sta, geom)
    if torch.is_grad_enabled() and (x.requires_grad or pi.requires_grad or dyn.requires_grad
                                    or (sta is not None and sta.requires_grad)):
        return WeightSpaceBMM.apply(x, pi, dyn, sta, geom)
    with torch.no_grad():
        return bmm_tiled_forward(x, pi, dyn, sta, geom)


def _fused(x, pi, dyn, sta, geom, padding):
    from .fused import fused_dynamic_conv2d  # C++ kernel: loaded only when the autotuner considers it

    return fused_dynamic_conv2d(x, pi, dyn, sta, geom, padding)


# "fused" (C++/OpenMP, inference only, built on first use) is an autotune candidate, not a user-facing name
_RUNNERS = {"weight": weight_space, "bmm": weight_space_bmm, "output": output_space, "fused": _fused}


def run_backend(name: str, x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry,
                padding) -> Tensor:
    """Run the concrete backend ``name`` (``padding`` as given to F.conv2d: int, pair or string)."""
    try:
        runner = _RUNNERS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(_RUNNERS)}") from None
    return runner(x, pi, dyn, sta, geom, padding)


__all__ = ["CONCRETE_BACKENDS", "aggregate_into_workspace", "output_space", "run_backend", "weight_space",
           "weight_space_bmm"]
