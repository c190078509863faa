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


def factor_values(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                  lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(lambda_d * M * dynamic, lambda_s * (1 - M) * static)`` without autograd bookkeeping."""
    with torch.no_grad():
        m = mask.to(dynamic.dtype)
        return dynamic * (lambda_d * m), static * (lambda_s * (1.0 - m))


def factor_grads(g_dyn, g_sta, dynamic, static, mask, lambda_s, lambda_d, need_d, need_s, need_ls, need_ld):
    """Map gradients of ``(dyn, sta)`` to ``(dynamic, static, mask=None, lambda_s, lambda_d)``."""
    m = mask.to(dynamic.dtype)
    g_dynamic = g_static = g_ls = g_ld = None
    if g_dyn is not None and (need_d or need_ld):
        gm = g_dyn * m
        if need_ld:
            g_ld = torch.dot(gm.reshape(-1), dynamic.reshape(-1)).reshape(lambda_d.shape).to(lambda_d.dtype)
        if need_d:
            g_dynamic = gm.mul_(lambda_d)
    if g_sta is not None and (need_s or need_ls):
        gs = g_sta * (1.0 - m)
        if need_ls:
            g_ls = torch.dot(gs.reshape(-1), static.reshape(-1)).reshape(lambda_s.shape).to(lambda_s.dtype)
        if need_s:
            g_static = gs.mul_(lambda_s)
    return g_dynamic, g_static, None, g_ls, g_ld


def masked_factors(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                   lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(lambda_d * M * dynamic, lambda_s * (1 - M) * static)``; see :class:`MaskedFactors`."""
    return MaskedFactors.apply(dynamic, static, mask, lambda_s, lambda_d)


__all__ = ["MaskedFactors", "factor_grads", "factor_values", "masked_factors"]
