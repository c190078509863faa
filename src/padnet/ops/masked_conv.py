"""Dynamic conv of an element-masked PAD layer straight from its parameters (training).

``y_b = conv(x_b, sum_k pi_bk lambda_d M W_k + lambda_s (1 - M) W_s)``. Building
the masked factors first (``dyn [K, *shape]``, ``sta [*shape]``) and handing
them to a backend keeps ``(K + 1)`` weight-sized copies alive until the
backward. Here the mask is folded into the backends' own autograd functions
instead, which save only the parameters. Both write the per-sample kernels as
one GEMM ``c @ F`` over a factor matrix (:class:`.masked_factors.ElementFactors`),
formed again in the backward instead of saved, so no static bias is broadcast
into the ``B x`` sized kernels:

- softmax routing (every row of ``pi`` sums to 1): ``F' [K, *shape]`` with the
  static part folded into every factor and ``c = pi``
  (:func:`.masked_factors.folded_factors`; the scales' gradients are mapped by hand);
- otherwise the K + 1 masked factors stacked, ``F [K + 1, *shape]``, with
  ``c = [lambda_d * pi, lambda_s]`` (``[B, K + 1]``, plain autograd for the scales).

Backends:

- ``"weight"``: :class:`MaskedAggregate` forms the per-sample kernels
  ``[B, *shape]`` with one GEMM for the grouped conv;
- ``"bmm"`` (``groups == 1``): :class:`MaskedWeightSpaceBMM` runs the tiled
  forward and backward on ``(c, F)``. With the compiled library and softmax
  routing, ``F'`` is applied inside the compiled factor GEMMs (never written)
  and the gradient is mapped to the parameters' in the last batch tile's pass;
  otherwise ``F`` is formed per channel tile right before its GEMMs (in the
  forward and again in the backward) and each tile of its gradient is mapped as
  soon as it is complete;
- otherwise the masked factors of :func:`.masked_factors.masked_factors`.
"""

from __future__ import annotations

import contextlib

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
from .masked_factors import ElementFactors, masked_factors, routing_coefficients


def _full_precision(t: Tensor):
    """No autocast inside a backward (a ``backward()`` called within an autocast region would otherwise
    run the gradient GEMMs in reduced precision, and the factor kernels expect the parameters' dtype)."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class MaskedAggregate(torch.autograd.Function):
    """Per-sample kernels ``[B, *shape]`` = ``coeffs @ factors``, one GEMM; saves only its inputs.

    ``folded`` (softmax routing): ``coeffs = pi [B, K]`` and the factors of
    :func:`.masked_factors.folded_factors`; otherwise ``coeffs = [lambda_d pi,
    lambda_s]`` (``[B, K + 1]``, :func:`.masked_factors.routing_coefficients`)
    and :func:`.masked_factors.stacked_factors`. The backward recomputes the factors.
    """

    @staticmethod
    def forward(ctx, coeffs: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                lambda_d: Tensor, folded: bool) -> Tensor:
        ctx.folded = folded
        ctx.save_for_backward(coeffs, dynamic, static, mask, lambda_s, lambda_d)
        factors = ElementFactors(folded, dynamic, static, mask, lambda_s, lambda_d)
        w = coeffs.to(dynamic.dtype) @ factors.columns(0, factors.numel)  # [B, P]
        return w.view(coeffs.shape[0], *dynamic.shape[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_w: Tensor):
        coeffs, dynamic, static, mask, lambda_s, lambda_d = ctx.saved_tensors
        need_c, need_d, need_s, _, need_ls, need_ld = ctx.needs_input_grad[:6]
        with _full_precision(g_w):
            factors = ElementFactors(ctx.folded, dynamic, static, mask, lambda_s, lambda_d)
            # under autocast the forward's GEMM ran in reduced precision and the kernels' gradient
            # arrives in it: the gradients are computed in the parameters' dtype
            g = g_w.reshape(g_w.shape[0], -1).to(dynamic.dtype)
            g_c = (g @ factors.columns(0, factors.numel).t()).to(coeffs.dtype) if need_c else None
            g_d = g_s = g_ls = g_ld = None
            if need_d or need_s or need_ls or need_ld:
                g_f = coeffs.to(g.dtype).t() @ g  # [rows, P]
                factors.prepare_grads(need_d, need_s, need_ls, need_ld)
                factors.map_grads(g_f, 0, factors.numel)
                g_d, g_s, g_ls, g_ld = factors.grads(g_f)
        return g_c, g_d, g_s, None, g_ls, g_ld, None


class MaskedWeightSpaceBMM(torch.autograd.Function):
    """The tiled weight-space conv of :mod:`.bmm_autograd` over ``coeffs @ factors`` (``groups == 1``).

    Coefficients and factors as in :class:`MaskedAggregate`; the factors are
    formed tile by tile in the forward and again in the backward instead of
    being saved, and the factors' gradient is mapped tile by tile.
    """

    @staticmethod
    def forward(ctx, x, coeffs, dynamic, static, mask, lambda_s, lambda_d, geom: ConvGeometry, folded: bool):
        ctx.geom, ctx.folded = geom, folded
        ctx.save_for_backward(x, coeffs, dynamic, static, mask, lambda_s, lambda_d)
        factors = ElementFactors(folded, dynamic, static, mask, lambda_s, lambda_d)
        return bmm_tiled_forward(x, coeffs, factors, None, geom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, coeffs, dynamic, static, mask, lambda_s, lambda_d = ctx.saved_tensors
        need_x, need_c, need_d, need_s, _, need_ls, need_ld = ctx.needs_input_grad[:7]
        need_f = need_d or need_s or need_ls or need_ld
        with _full_precision(gy):
            factors = ElementFactors(ctx.folded, dynamic, static, mask, lambda_s, lambda_d)
            factors.prepare_grads(need_d, need_s, need_ls, need_ld)
            gx, g_c, g_f, _ = bmm_backward(x, coeffs, factors, None, ctx.geom, gy, need_x, need_c, need_f, False)
            g_d, g_s, g_ls, g_ld = factors.grads(g_f.view(factors.rows, -1)) if need_f else (None,) * 4
        return gx, g_c, g_d, g_s, None, g_ls, g_ld, None, None


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
    sums to 1) folds the static part into the K dynamic factors,
    ``sum_k pi_k (dyn_k + sta) = sum_k pi_k dyn_k + sta``: K convs instead of K + 1 in output
    space, and GEMMs of the fully dynamic shapes in weight space. The values are the same; the
    gradient w.r.t. ``pi`` then differs from the unfolded formula's by the same amount in every
    column of a row, which the softmax's backward removes (logits and everything upstream get
    the same gradients).
    """
    geom = conv_geometry(dynamic.shape[-2:], stride, padding, dilation, groups)
    exporting = is_exporting()
    # softmax routing: the static part folds into the K factors (GEMMs of a fully dynamic layer's shapes);
    # otherwise K + 1 stacked factors with coefficients [lambda_d pi, lambda_s]
    folded = routing_sums_to_one
    coeffs = pi if folded else routing_coefficients(pi, lambda_s, lambda_d)  # [B, K] or [B, K + 1]
    if x.shape[0] == 1 and not exporting:
        name = "weight"
    else:
        # tuned on what the weight-space backends run here: the factor matrix's shape, no static bias.
        # ``factor_shape`` is a stride-0 view with that shape, of a parameter that needs a gradient if any
        # does (the tuning key and the timed trials depend on it); the backends copy it in the trials, as
        # the real call writes the factors.
        source = static if static.requires_grad or not dynamic.requires_grad else dynamic[0]
        factor_shape = source.unsqueeze(0).expand(coeffs.shape[1], *static.shape)
        name = resolve_backend(x, coeffs, factor_shape, None, stride, padding, dilation, groups, "auto", geom=geom)
    if exporting or name == "output" or (name == "bmm" and groups > 1):
        dyn, sta = masked_factors(dynamic, static, mask, lambda_s, lambda_d)
        if name == "output" and routing_sums_to_one and sta is not None:
            dyn, sta = dyn + sta, None
        y = run_backend(name, x, pi, dyn, sta, geom, padding)
    elif name == "weight":
        b, c, h, w = x.shape
        kernels = MaskedAggregate.apply(coeffs, dynamic, static, mask, lambda_s, lambda_d, folded)
        y = F.conv2d(x.reshape(1, b * c, h, w), kernels.reshape(b * dynamic.shape[1], *dynamic.shape[2:]), None,
                     geom.stride, padding, geom.dilation, b * groups)
        y = y.reshape(b, dynamic.shape[1], *y.shape[-2:])
    else:  # "bmm", and "fused" (an inference choice: here the masks fold tile by tile in the masked GEMM)
        y = MaskedWeightSpaceBMM.apply(x, coeffs, dynamic, static, mask, lambda_s, lambda_d, geom, folded)
    bias = mix_bias(pi, bias_dyn, bias_sta)
    if bias is not None:
        y = y + bias[:, :, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


__all__ = ["MaskedAggregate", "MaskedWeightSpaceBMM", "masked_dynamic_conv2d"]
