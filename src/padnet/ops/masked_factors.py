"""Masked, scaled PAD factors with a memory-lean backward (training of element masks).

``dyn = lambda_d * M * W_k`` and ``sta = lambda_s * (1 - M) * W_s`` written as
plain tensor products keep four ``[*shape]`` temporaries alive for the
backward (``lambda_d * M``, ``1 - M``, ``lambda_s * (1 - M)`` and their
products' operands); this function saves only its inputs (parameters and the
mask buffer, no new memory) and recomputes the masks in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import fused_enabled, load_fused
from .workspace import workspace


class MaskedFactors(torch.autograd.Function):
    """``(dynamic [K, *shape], static [*shape], mask [*shape], lambda_s [], lambda_d []) -> (dyn, sta)``.

    The mask gets no gradient (use plain tensor products where dL/dM is needed).
    """

    @staticmethod
    def forward(ctx, dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor, lambda_d: Tensor):
        ctx.save_for_backward(dynamic, static, mask, lambda_s, lambda_d)
        m = mask.to(dynamic.dtype)
        return dynamic * (lambda_d * m), static * (lambda_s * (1.0 - m))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_dyn: Tensor | None, g_sta: Tensor | None):
        dynamic, static, mask, lambda_s, lambda_d = ctx.saved_tensors
        need_d, need_s, _, need_ls, need_ld = ctx.needs_input_grad
        return factor_grads(g_dyn, g_sta, dynamic, static, mask, lambda_s, lambda_d, need_d, need_s, need_ls, need_ld)


def factor_grads(g_dyn, g_sta, dynamic, static, mask, lambda_s, lambda_d, need_d, need_s, need_ls, need_ld,
                 in_place: bool = False):
    """Map gradients of ``(dyn, sta)`` to ``(dynamic, static, mask=None, lambda_s, lambda_d)``.

    ``in_place``: ``g_dyn`` and ``g_sta`` are the caller's own temporaries and are overwritten.
    """
    m = mask.to(dynamic.dtype)
    g_dynamic = g_static = g_ls = g_ld = None
    if g_dyn is not None and (need_d or need_ld):
        gm = g_dyn.mul_(m) if in_place else g_dyn * m
        if need_ld:
            g_ld = torch.dot(gm.reshape(-1), dynamic.reshape(-1)).reshape(lambda_d.shape).to(lambda_d.dtype)
        if need_d:
            g_dynamic = gm.mul_(lambda_d)
    if g_sta is not None and (need_s or need_ls):
        gs = g_sta.addcmul_(g_sta, m, value=-1.0) if in_place else g_sta * (1.0 - m)  # (1 - M) g
        if need_ls:
            g_ls = torch.dot(gs.reshape(-1), static.reshape(-1)).reshape(lambda_s.shape).to(lambda_s.dtype)
        if need_s:
            g_static = gs.mul_(lambda_s)
    return g_dynamic, g_static, None, g_ls, g_ld


# workspace slots of the factor matrices and their two [*shape] helpers (the backends use 0-4)
_FACTOR_SLOT, _STATIC_SLOT, _SCALE_SLOT = 5, 6, 7


def stacked_factors(dynamic: Tensor, static: Tensor, mask: Tensor) -> Tensor:
    """``F [K + 1, *shape]``: ``F[k] = M * dynamic[k]`` (``k < K``), ``F[K] = (1 - M) * static``; no autograd.

    With the routing coefficients ``c = [lambda_d * pi, lambda_s]`` (``[B, K + 1]``)
    the per-sample kernels are ``c @ F``: one GEMM without a bias term (a bias
    would be broadcast into the ``[B, *shape]`` output first, one more pass over
    it), and the scales live in ``c``, where ordinary autograd differentiates them.
    ``F`` lives in a reused per-thread workspace (valid until the next call):
    a fresh allocation of this size would be page-faulted in on every call.
    """
    k = dynamic.shape[0]
    with torch.no_grad():
        m = mask.to(dynamic.dtype)
        out = workspace(_FACTOR_SLOT, (k + 1) * static.numel(), dynamic).view(k + 1, *static.shape)
        for i in range(k):  # same-shape operands: the contiguous, vectorised kernels (no broadcasting)
            torch.mul(dynamic[i], m, out=out[i])
        torch.addcmul(static, static, m, value=-1.0, out=out[k])  # (1 - M) W_s
    return out


def _compiled_folding(dynamic: Tensor, static: Tensor, mask: Tensor):
    """The compiled module of :mod:`.fused` if its one-pass folding kernels can serve these tensors, else ``None``.

    CPU, float32/float64, one dtype, contiguous parameters, a mask of the weight's shape (not broadcast),
    ``PADNET_FUSED`` not off and a build available (otherwise the chain of aten ops below serves; the values
    agree to float rounding).
    """
    if (dynamic.device.type != "cpu" or dynamic.dtype not in (torch.float32, torch.float64)
            or static.dtype != dynamic.dtype or not dynamic.is_contiguous() or not static.is_contiguous()
            or mask.shape != static.shape or dynamic.shape[1:] != static.shape or not fused_enabled()):
        return None
    module = load_fused()
    return module if module is not None and hasattr(module, "fold_factors") else None


def folded_factors(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor, lambda_d: Tensor) -> Tensor:
    """``F' [K, *shape]``, ``F'[k] = lambda_d M dynamic[k] + lambda_s (1 - M) static``; no autograd.

    Under softmax routing (every row of ``pi`` sums to 1) the per-sample kernels
    are ``pi @ F'``: the static part folded into each of the K factors, so the
    weight-space GEMMs have exactly the shapes of a fully dynamic layer's. ``F'``
    is written into a reused workspace (valid until the next call), as in
    :func:`stacked_factors`: by the compiled one-pass kernel of :mod:`.fused`
    where it is available (reads the K + 2 inputs once, writes ``F'`` once), else
    by one ``addcmul`` per factor.
    """
    k = dynamic.shape[0]
    with torch.no_grad():
        m = mask.to(dynamic.dtype)
        out = workspace(_FACTOR_SLOT, k * static.numel(), dynamic).view(k, *static.shape)
        module = _compiled_folding(dynamic, static, mask)
        if module is not None:
            module.fold_factors(dynamic.view(k, -1), static.view(-1), m.contiguous().view(-1),
                                float(lambda_s), float(lambda_d), out.view(k, -1))
            return out
        sta = workspace(_STATIC_SLOT, static.numel(), static).view_as(static)
        torch.addcmul(static, static, m, value=-1.0, out=sta).mul_(lambda_s)  # lambda_s (1 - M) W_s
        md = torch.mul(m, lambda_d, out=workspace(_SCALE_SLOT, m.numel(), m).view_as(m))  # lambda_d M
        for i in range(k):
            torch.addcmul(sta, dynamic[i], md, out=out[i])
    return out


def stacked_factor_grads(g_stack: Tensor, mask: Tensor, need_d: bool, need_s: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
    """Map the gradient of :func:`stacked_factors` (``[K + 1, *shape]``, consumed in place) to ``(g_dynamic, g_static)``."""
    k = g_stack.shape[0] - 1
    m = mask.to(g_stack.dtype)
    g_dynamic = g_stack[:k].mul_(m) if need_d else None
    g_static = g_stack[k].addcmul_(g_stack[k], m, value=-1.0) if need_s else None  # (1 - M) g, in place
    return g_dynamic, g_static


def folded_factor_grads(g_fold: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                        lambda_d: Tensor, need_d: bool, need_s: bool, need_ls: bool, need_ld: bool):
    """Map the gradient of :func:`folded_factors` (``[K, *shape]``, consumed in place) to
    ``(g_dynamic, g_static, g_lambda_s, g_lambda_d)`` (``None`` where not needed).

    ``dL/dW_k = lambda_d M g_k``, ``dL/dW_s = lambda_s (1 - M) sum_k g_k``,
    ``dL/dlambda_d = sum_k <M g_k, W_k>``, ``dL/dlambda_s = <(1 - M) sum_k g_k, W_s>``.
    """
    module = (_compiled_folding(dynamic, static, mask)
              if g_fold.is_contiguous() and g_fold.dtype == dynamic.dtype else None)
    if module is not None:  # one pass over g, W_k, W_s and M
        k = g_fold.shape[0]
        g_sta, g_ls, g_ld = module.fold_factor_grads(
            g_fold.view(k, -1), dynamic.view(k, -1), static.view(-1), mask.to(dynamic.dtype).contiguous().view(-1),
            float(lambda_s), float(lambda_d), need_d, need_s)
        return (g_fold if need_d else None, g_sta.view_as(static) if need_s else None,
                lambda_s.new_tensor(g_ls).reshape(lambda_s.shape) if need_ls else None,
                lambda_d.new_tensor(g_ld).reshape(lambda_d.shape) if need_ld else None)
    g_sum = g_fold.sum(0) if need_s or need_ls else None  # before g_fold is overwritten
    g_dynamic, g_static, _, g_ls, g_ld = factor_grads(g_fold, g_sum, dynamic, static, mask, lambda_s, lambda_d,
                                                      need_d, need_s, need_ls, need_ld, in_place=True)
    return g_dynamic, g_static, g_ls, g_ld


def routing_coefficients(pi: Tensor, lambda_s: Tensor, lambda_d: Tensor) -> Tensor:
    """``c [B, K + 1] = [lambda_d * pi, lambda_s]``, the coefficients of :func:`stacked_factors` (autograd)."""
    return torch.cat([pi * lambda_d.to(pi.dtype), lambda_s.to(pi.dtype).expand(pi.shape[0], 1)], dim=1)


def masked_factors(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                   lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(lambda_d * M * dynamic, lambda_s * (1 - M) * static)``; see :class:`MaskedFactors`."""
    return MaskedFactors.apply(dynamic, static, mask, lambda_s, lambda_d)


__all__ = ["MaskedFactors", "factor_grads", "folded_factor_grads", "folded_factors", "masked_factors",
           "routing_coefficients",
           "stacked_factor_grads", "stacked_factors"]
