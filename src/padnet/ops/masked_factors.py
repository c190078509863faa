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

from .bmm_kernels import compiled_factor_gemms
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


class ElementFactors:
    """The factor matrix of an element-masked PAD layer, formed and differentiated by column range; no autograd.

    ``dynamic [K, *shape]``, ``static`` and ``mask`` ``[*shape]`` (the mask may broadcast), ``lambda_*`` 0-d or
    1-element. With ``P = prod(shape)`` and the columns in the weight's flattened order (the columns of output
    channels ``o0:o1`` are ``o0 * P/O : o1 * P/O``):

    - ``folded`` (softmax routing, every row of ``pi`` sums to 1): ``F' [K, P]``,
      ``F'[k] = lambda_d M W_k + lambda_s (1 - M) W_s``; the per-sample kernels are ``pi @ F'``;
    - otherwise the K + 1 stacked masked factors ``F [K + 1, P]``, ``F[k] = M W_k``,
      ``F[K] = (1 - M) W_s``, with the coefficients ``[lambda_d pi, lambda_s]`` of
      :func:`routing_coefficients` (ordinary autograd differentiates the scales there).

    The tiled weight-space GEMM (:mod:`.bmm_autograd`) works one tile of columns at a time. With
    the compiled library and folded factors (``compiled``), :meth:`mix` and :meth:`grad_pass` apply
    ``F'`` inside the compiled kernels (it is never written), and the last batch tile's pass maps
    the finished gradient to the parameters'; otherwise it asks for each tile's :meth:`columns`
    right before using them and hands each completed tile of the gradient to :meth:`map_grads`.
    :class:`.masked_conv.MaskedAggregate` asks for all columns at once. :meth:`columns` writes into
    a reused per-thread workspace (a fresh buffer of this size would be page-faulted in on every
    call), valid until its next use; the folded columns are formed by the compiled one-pass kernel
    of :mod:`.fused` where it serves these tensors, else by one ``addcmul`` per factor.
    """

    def __init__(self, folded: bool, dynamic: Tensor, static: Tensor, mask: Tensor,
                 lambda_s: Tensor | None = None, lambda_d: Tensor | None = None) -> None:
        if folded and (lambda_s is None or lambda_d is None):
            raise ValueError("ElementFactors: the folded factors need both scales")
        k = dynamic.shape[0]
        self.folded = folded
        self.rows = k if folded else k + 1
        self.dtype = dynamic.dtype
        self.kernel_shape = tuple(static.shape)
        self.out_channels = static.shape[0]
        self.numel = static.numel()
        self._module = _compiled_folding(dynamic, static, mask) if folded else None
        # the compiled factor GEMMs (the tiled conv's mix and gradient pass) form F' inside their blocks
        self.compiled = compiled_factor_gemms(dynamic.dtype, dynamic.device, k) if self._module is not None else None
        self._dyn = dynamic.detach().reshape(k, -1)
        self._sta = static.detach().reshape(-1)
        self._mask = mask.detach().to(dynamic.dtype).expand(static.shape).reshape(-1)
        self._scales = (lambda_s, lambda_d)
        # the compiled kernels take the scales as numbers (CPU tensors: no device sync); the aten ops, tensors
        self._ls = float(lambda_s) if self._module is not None else None
        self._ld = float(lambda_d) if self._module is not None else None
        self._need = (False, False, False, False)
        self._g_static: Tensor | None = None
        # dL/dlambda_s, dL/dlambda_d, summed over column ranges in order (numbers from the compiled kernels,
        # 0-d tensors from the aten ops)
        self._g_scales: list = [0.0, 0.0]

    def columns(self, lo: int, hi: int) -> Tensor:
        """``F[:, lo:hi]`` (``[rows, hi - lo]``), formed into the workspace (valid until its next use)."""
        n = hi - lo
        dyn, sta, m = self._dyn[:, lo:hi], self._sta[lo:hi], self._mask[lo:hi]
        out = workspace(_FACTOR_SLOT, self.rows * n, self._dyn).view(self.rows, n)
        with torch.no_grad():
            if not self.folded:
                for i in range(self.rows - 1):  # same-shape operands: the contiguous, vectorised kernels
                    torch.mul(dyn[i], m, out=out[i])
                torch.addcmul(sta, sta, m, value=-1.0, out=out[-1])  # (1 - M) W_s
            elif self._module is not None:
                self._module.fold_factors(dyn, sta, m, self._ls, self._ld, out)
            else:
                lambda_s, lambda_d = (t.detach() for t in self._scales)
                st = workspace(_STATIC_SLOT, n, self._sta)
                torch.addcmul(sta, sta, m, value=-1.0, out=st).mul_(lambda_s)  # lambda_s (1 - M) W_s
                md = torch.mul(m, lambda_d, out=workspace(_SCALE_SLOT, n, self._mask))  # lambda_d M
                for i in range(self.rows):
                    torch.addcmul(st, dyn[i], md, out=out[i])
        return out

    def prepare_grads(self, need_d: bool, need_s: bool, need_ls: bool, need_ld: bool) -> None:
        """Say which parameter gradients :meth:`map_grads` must produce (before the first call)."""
        self._need = (need_d, need_s, need_ls and self.folded, need_ld and self.folded)
        if self.folded and need_s:
            self._g_static = self._sta.new_empty(self.numel)
        self._g_scales = [0.0, 0.0]

    def map_grads(self, g: Tensor, lo: int, hi: int) -> None:
        """Map ``dL/dF[:, lo:hi]`` (``g [rows, hi - lo]``, complete, consumed in place) to the parameters'.

        Folded: ``dL/dW_k = lambda_d M g_k`` (in place), ``dL/dW_s = lambda_s (1 - M) sum_k g_k``,
        ``dL/dlambda_d = sum_k <M g_k, W_k>``, ``dL/dlambda_s = <(1 - M) sum_k g_k, W_s>``.
        Stacked: ``M g_k`` and ``(1 - M) g_K`` in place.
        """
        need_d, need_s, need_ls, need_ld = self._need
        dyn, sta, m = self._dyn[:, lo:hi], self._sta[lo:hi], self._mask[lo:hi]
        with torch.no_grad():
            if not self.folded:
                if need_d:
                    g[:-1].mul_(m)
                if need_s:
                    g[-1].addcmul_(g[-1], m, value=-1.0)  # (1 - M) g, in place
                return
            g_sta_out = self._g_static[lo:hi] if need_s else None
            if self._module is not None and g.dtype == dyn.dtype:  # one pass over g, W_k, W_s and M
                _, g_ls, g_ld = self._module.fold_factor_grads(g, dyn, sta, m, self._ls, self._ld, need_d, need_s,
                                                               g_sta_out)
            else:
                g_sum = g.sum(0) if need_s or need_ls else None  # before g is overwritten
                lambda_s, lambda_d = self._scales
                _, g_st, _, g_ls, g_ld = factor_grads(g, g_sum, dyn, sta, m, lambda_s, lambda_d, need_d, need_s,
                                                      need_ls, need_ld, in_place=True)
                if need_s:
                    g_sta_out.copy_(g_st)
                g_ls = g_ls.sum() if g_ls is not None else 0.0
                g_ld = g_ld.sum() if g_ld is not None else 0.0
        self._g_scales[0] = self._g_scales[0] + g_ls
        self._g_scales[1] = self._g_scales[1] + g_ld

    def mix(self, pi: Tensor, lo: int, hi: int, out: Tensor) -> None:
        """``out [B, hi - lo] = pi @ F'[:, lo:hi]``, ``F'`` formed per block of entries inside the compiled kernel."""
        self.compiled.mix_factors(pi, self._dyn[:, lo:hi], self._sta[lo:hi], self._mask[lo:hi], self._ls, self._ld,
                                  out)

    def grad_pass(self, gw: Tensor, pi: Tensor, g: Tensor | None, accumulate: bool, last: bool,
                  gpi: Tensor | None, lo: int, hi: int) -> None:
        """One compiled pass over ``gw [B, hi - lo]`` (the per-sample kernels' gradient): ``g (+)= pi^T gw``
        (``dL/dF'``, ``[rows, hi - lo]``, may be ``None``) and ``gpi += gw F'^T``; ``last`` (the tile's
        ``dL/dF'`` is then complete): mapped to the parameters' gradients in the same pass, as
        :meth:`map_grads` does."""
        need_d, need_s, _, _ = self._need
        finish = last and g is not None
        g_ls, g_ld = self.compiled.factor_grad_pass(
            gw, pi, self._dyn[:, lo:hi], self._sta[lo:hi], self._mask[lo:hi], self._ls, self._ld, g, accumulate,
            finish, need_d, gpi, self._g_static[lo:hi] if finish and need_s else None)
        if finish:
            self._g_scales[0] += g_ls
            self._g_scales[1] += g_ld

    def grads(self, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(g_dynamic [K, *shape], g_static [*shape], g_lambda_s, g_lambda_d)`` once every column of ``g``
        (``[rows, P]``) went through :meth:`map_grads`; ``None`` where not needed (always for the stacked
        factors' scales)."""
        need_d, need_s, need_ls, need_ld = self._need
        k = self._dyn.shape[0]
        g_dynamic = g[:k].view(k, *self.kernel_shape) if need_d else None
        if not need_s:
            g_static = None
        elif self.folded:
            g_static = self._g_static.view(self.kernel_shape)
        else:
            g_static = g[k].view(self.kernel_shape)
        lambda_s, lambda_d = self._scales
        g_ls = _scale_grad(self._g_scales[0], lambda_s) if need_ls else None
        g_ld = _scale_grad(self._g_scales[1], lambda_d) if need_ld else None
        return g_dynamic, g_static, g_ls, g_ld


def _scale_grad(value, scale: Tensor) -> Tensor:
    """A scale's gradient (a number or a 0-d tensor) as a tensor of the scale's dtype, device and shape."""
    if isinstance(value, Tensor):
        return value.to(scale.dtype).reshape(scale.shape)
    return scale.new_tensor(value).reshape(scale.shape)


def stacked_factors(dynamic: Tensor, static: Tensor, mask: Tensor) -> Tensor:
    """``F [K + 1, *shape]`` of :class:`ElementFactors` (stacked), all columns; in the workspace, no autograd."""
    factors = ElementFactors(False, dynamic, static, mask)
    return factors.columns(0, factors.numel).view(factors.rows, *factors.kernel_shape)


def folded_factors(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor, lambda_d: Tensor) -> Tensor:
    """``F' [K, *shape]``, ``F'[k] = lambda_d M dynamic[k] + lambda_s (1 - M) static``; no autograd.

    Under softmax routing (every row of ``pi`` sums to 1) the per-sample kernels
    are ``pi @ F'``: the static part folded into each of the K factors, so the
    weight-space GEMMs have exactly the shapes of a fully dynamic layer's. All
    columns of :class:`ElementFactors` (folded), in the workspace.
    """
    factors = ElementFactors(True, dynamic, static, mask, lambda_s, lambda_d)
    return factors.columns(0, factors.numel).view(factors.rows, *factors.kernel_shape)


def folded_factor_grads(g_fold: Tensor, dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                        lambda_d: Tensor, need_d: bool, need_s: bool, need_ls: bool, need_ld: bool):
    """Map the gradient of :func:`folded_factors` (``[K, *shape]``, consumed in place when contiguous) to
    ``(g_dynamic, g_static, g_lambda_s, g_lambda_d)`` (``None`` where not needed); see
    :meth:`ElementFactors.map_grads`.
    """
    factors = ElementFactors(True, dynamic, static, mask, lambda_s, lambda_d)
    g = g_fold.contiguous().view(factors.rows, -1)
    factors.prepare_grads(need_d, need_s, need_ls, need_ld)
    factors.map_grads(g, 0, factors.numel)
    return factors.grads(g)


def routing_coefficients(pi: Tensor, lambda_s: Tensor, lambda_d: Tensor) -> Tensor:
    """``c [B, K + 1] = [lambda_d * pi, lambda_s]``, the coefficients of :func:`stacked_factors` (autograd)."""
    return torch.cat([pi * lambda_d.to(pi.dtype), lambda_s.to(pi.dtype).expand(pi.shape[0], 1)], dim=1)


def masked_factors(dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor,
                   lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(lambda_d * M * dynamic, lambda_s * (1 - M) * static)``; see :class:`MaskedFactors`."""
    return MaskedFactors.apply(dynamic, static, mask, lambda_s, lambda_d)


__all__ = ["ElementFactors", "MaskedFactors", "factor_grads", "folded_factor_grads", "folded_factors",
           "masked_factors", "routing_coefficients", "stacked_factors"]
