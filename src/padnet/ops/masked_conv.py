"""Dynamic conv of an element-masked PAD layer straight from its parameters (training).

``y_b = conv(x_b, sum_k pi_bk lambda_d M W_k + lambda_s (1 - M) W_s)``. Building
the masked factors first (``dyn [K, *shape]``, ``sta [*shape]``) and handing
them to a backend keeps ``(K + 1)`` weight-sized copies alive until the
backward. Here the mask is folded into the backends' own autograd functions
instead, which save only the parameters:

- ``"weight"``: :class:`MaskedAggregate` forms the per-sample kernels
  ``[B, *shape]`` directly (one GEMM, the masks applied to its output);
- ``"bmm"`` (``groups == 1``): :class:`MaskedWeightSpaceBMM` recomputes the
  masked factors in the backward and reuses the tiled backward;
- otherwise the masked factors of :func:`.masked_factors.masked_factors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend_selection import conv_geometry, resolve_backend
from .bmm_autograd import bmm_backward
from .bmm_kernels import bmm_tiled_forward
from .conv_backends import run_backend
from .dynamic_conv import mix_bias
from .exporting import is_exporting
from .geometry import ConvGeometry
from .masked_factors import factor_grads, factor_values, masked_factors


class MaskedAggregate(torch.autograd.Function):
    """Per-sample kernels ``[B, *shape]`` = ``lambda_d M (pi @ W) + lambda_s (1 - M) W_s``; saves only inputs."""

    @staticmethod
    def forward(ctx, pi: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                lambda_d: Tensor) -> Tensor:
        ctx.save_for_backward(pi, dynamic, static, mask, lambda_s, lambda_d)
        k = dynamic.shape[0]
        # mask the K + 1 factors (K * P + P values, freed on return), then one GEMM with the static part as
        # its bias: cheaper than masking the B per-sample kernels afterwards (2 passes over B * P) when B > K
        dyn, sta = factor_values(dynamic, static, mask, lambda_s, lambda_d)
        w = torch.addmm(sta.reshape(-1), pi.to(dynamic.dtype), dyn.reshape(k, -1))  # [B, P]
        return w.view(pi.shape[0], *dynamic.shape[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_w: Tensor):
        pi, dynamic, static, mask, lambda_s, lambda_d = ctx.saved_tensors
        need_pi, need_d, need_s, _, need_ls, need_ld = ctx.needs_input_grad
        k = dynamic.shape[0]
        flat = dynamic.reshape(k, -1)
        m = mask.to(dynamic.dtype).reshape(-1)
        g = g_w.reshape(g_w.shape[0], -1)
        g_pi = g_dyn = g_sta = None
        if need_pi:
            g_pi = (g @ (flat * (lambda_d * m)).t()).to(pi.dtype)
        if need_d or need_ld:
            g_dyn = (pi.to(g.dtype).t() @ g).view_as(dynamic)  # gradient w.r.t. the masked factors
        if need_s or need_ls:
            g_sta = g.sum(0).view_as(static)
        g_dynamic, g_static, _, g_ls, g_ld = factor_grads(g_dyn, g_sta, dynamic, static, mask, lambda_s, lambda_d,
                                                          need_d, need_s, need_ls, need_ld)
        return g_pi, g_dynamic, g_static, None, g_ls, g_ld


class MaskedWeightSpaceBMM(torch.autograd.Function):
    """The tiled weight-space conv of :mod:`.bmm_autograd` fed from the parameters (``groups == 1``)."""

    @staticmethod
    def forward(ctx, x, pi, dynamic, static, mask, lambda_s, lambda_d, geom: ConvGeometry):
        ctx.geom = geom
        ctx.save_for_backward(x, pi, dynamic, static, mask, lambda_s, lambda_d)
        dyn, sta = factor_values(dynamic, static, mask, lambda_s, lambda_d)
        return bmm_tiled_forward(x, pi, dyn, sta, geom)  # dyn, sta are freed on return

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, pi, dynamic, static, mask, lambda_s, lambda_d = ctx.saved_tensors
        need_x, need_pi, need_d, need_s, _, need_ls, need_ld = ctx.needs_input_grad[:7]
        dyn, sta = factor_values(dynamic, static, mask, lambda_s, lambda_d)
        gx, gpi, g_dyn, g_sta = bmm_backward(x, pi, dyn, sta, ctx.geom, gy, need_x, need_pi, need_d or need_ld,
                                             need_s or need_ls)
        del dyn, sta
        g_dynamic, g_static, _, g_ls, g_ld = factor_grads(g_dyn, g_sta, dynamic, static, mask, lambda_s, lambda_d,
                                                          need_d, need_s, need_ls, need_ld)
        return gx, gpi, g_dynamic, g_static, None, g_ls, g_ld, None


def masked_dynamic_conv2d(
    x: Tensor,
    pi: Tensor,
    dynamic: Tensor,
    static: Tensor,
    mask: Tensor,
    lambda_s: Tensor,
    lambda_d: Tensor,
    bias_dyn: Tensor | None = None,
    bias_sta: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    routing_sums_to_one: bool = False,
) -> Tensor:
    """``dynamic_conv2d(x, pi, lambda_d M dynamic, lambda_s (1 - M) static, bias...)`` without the copies.

    Shapes: ``x [B, C, H, W]``, ``pi [B, K]``, ``dynamic [K, O, C/groups, kh, kw]``,
    ``static`` and ``mask`` ``[O, C/groups, kh, kw]``, ``lambda_*`` 0-d. Returns ``[B, O, H', W']``.
    The mask receives no gradient. ``routing_sums_to_one`` (softmax routing: every row of ``pi``
    sums to 1) lets the output-space backend fold the static part into the K dynamic factors,
    ``sum_k pi_k (dyn_k + sta) = sum_k pi_k dyn_k + sta``: K convs instead of K + 1.
    """
    geom = conv_geometry(dynamic.shape[-2:], stride, padding, dilation, groups)
    exporting = is_exporting()
    name = "weight" if x.shape[0] == 1 and not exporting else resolve_backend(
        x, pi, dynamic, static, stride, padding, dilation, groups, "auto", geom=geom)
    if exporting or name == "output" or (name == "bmm" and groups > 1):
        dyn, sta = masked_factors(dynamic, static, mask, lambda_s, lambda_d)
        if name == "output" and routing_sums_to_one and sta is not None:
            dyn, sta = dyn + sta, None
        y = run_backend(name, x, pi, dyn, sta, geom, padding)
    elif name == "weight":
        b, c, h, w = x.shape
        kernels = MaskedAggregate.apply(pi, dynamic, static, mask, lambda_s, lambda_d)
        y = F.conv2d(x.reshape(1, b * c, h, w), kernels.reshape(b * dynamic.shape[1], *dynamic.shape[2:]), None,
                     geom.stride, padding, geom.dilation, b * groups)
        y = y.reshape(b, dynamic.shape[1], *y.shape[-2:])
    else:
        y = MaskedWeightSpaceBMM.apply(x, pi, dynamic, static, mask, lambda_s, lambda_d, geom)
    bias = mix_bias(pi, bias_dyn, bias_sta)
    if bias is not None:
        y = y + bias[:, :, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


__all__ = ["MaskedAggregate", "MaskedWeightSpaceBMM", "masked_dynamic_conv2d"]
