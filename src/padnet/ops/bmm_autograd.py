"""Custom autograd function of the tiled weight-space GEMM conv (``groups == 1``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .bmm_kernels import bmm_tiled_forward, factor_source, tiles
from .geometry import ConvGeometry
from .im2col import col2im, im2col_workspace
from .workspace import workspace


class WeightSpaceBMM(torch.autograd.Function):
    """``y = conv(x_b, pi_b @ dyn + sta)`` per sample, forward and backward tile by tile.

    Backward per (batch tile, output-channel tile): recompute the tile's
    per-sample kernels and unfolded input, then
    ``gcols += W^T gy`` (input gradient, folded back per batch tile),
    ``gW = gy cols^T`` reduced at once into ``gdyn += pi^T gW``,
    ``gsta += sum_b gW`` and ``gpi += gW dyn^T`` (without a static part and with
    the compiled library: ``gdyn`` and ``gpi`` in one pass over ``gW``,
    ``factor_grad_pass`` of :mod:`.fused`), so the B per-sample kernels and their
    gradients are never materialised whole.
    """

    @staticmethod
    def forward(ctx, x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry) -> Tensor:
        ctx.geom = geom
        ctx.save_for_backward(x, pi, dyn, sta)
        return bmm_tiled_forward(x, pi, dyn, sta, geom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, pi, dyn, sta = ctx.saved_tensors
        need_x, need_pi, need_dyn, need_sta = ctx.needs_input_grad[:4]
        gx, gpi, gdyn, gsta = bmm_backward(x, pi, dyn, sta, ctx.geom, gy, need_x, need_pi, need_dyn, need_sta)
        return gx, gpi, gdyn, gsta, None


def bmm_backward(x: Tensor, pi: Tensor, dyn, sta: Tensor | None, geom: ConvGeometry, gy: Tensor,
                 need_x: bool, need_pi: bool, need_dyn: bool, need_sta: bool):
    """Gradients ``(gx, gpi, gdyn, gsta)`` of the tiled weight-space conv (``None`` where not needed).

    ``dyn``: the factors ``[K, O, C, kh, kw]`` or a factor source (:class:`.bmm_kernels.StoredFactors`):
    its columns are asked for per tile, and each channel tile of ``gdyn`` is handed to the source's
    ``map_grads`` as soon as the last batch tile completed it. ``gdyn`` is ``[rows, *kernel_shape]``.
    """
    source = factor_source(dyn)
    need_sta = need_sta and sta is not None
    batch = x.shape[0]
    k, o = source.rows, source.out_channels
    ck = source.numel // o
    ho, wo = geom.out_hw(x.shape[-2:])
    pixels = ho * wo
    gy = gy.reshape(batch, o, pixels).contiguous()
    sflat = None if sta is None else sta.reshape(o * ck)
    pi = pi.to(source.dtype)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    # written by the first batch tile (gdyn, gsta) / output-channel tile (gpi), accumulated by later ones:
    # no zero-filling pass over the K weight-sized gradient
    # (an empty batch writes nothing: zeros then)
    alloc = torch.Tensor.new_zeros if batch == 0 else torch.Tensor.new_empty
    gdyn = alloc(x, (k, o * ck), dtype=source.dtype) if need_dyn else None
    gsta = alloc(x, (o * ck,), dtype=source.dtype) if need_sta else None
    gpi = alloc(pi, (batch, k)) if need_pi else None
    need_gw = need_pi or need_dyn or need_sta
    # the compiled kernels: the per-sample kernels of a tile in one pass over the factors, and dL/dF with
    # dL/dpi in one pass over their gradient (MKL's GEMMs read it twice); not with a separate static part
    compiled = source.compiled is not None and sta is None
    if compiled and need_pi:
        gpi.zero_()  # the pass adds to it
    ones = pi.new_ones(batch) if need_sta else None
    bc, oc = tiles(batch, o, ck, pixels, x.element_size())
    tile = min(bc * oc, batch * o) * ck
    wbuf = workspace(0, tile, x) if need_x else None
    gwbuf = workspace(1, tile, x) if need_gw else None
    gcols = workspace(2, min(bc, batch) * ck * pixels, x).view(min(bc, batch), ck, pixels) if need_x else None
    for b0 in range(0, batch, bc):
        b1 = min(batch, b0 + bc)
        nb = b1 - b0
        cols = im2col_workspace(x[b0:b1], geom) if need_gw else None
        gc = gcols[:nb] if need_x else None
        for o0 in range(0, o, oc):
            o1 = min(o, o0 + oc)
            lo, hi = o0 * ck, o1 * ck
            n = hi - lo
            gy_t = gy[b0:b1, o0:o1]
            f = source.columns(lo, hi) if not compiled and (need_x or need_pi) else None
            if need_x:
                w = wbuf[: nb * n].view(nb, n)
                if compiled:
                    source.mix(pi[b0:b1], lo, hi, w)
                elif sflat is None:
                    torch.mm(pi[b0:b1], f, out=w)
                else:
                    torch.addmm(sflat[lo:hi], pi[b0:b1], f, out=w)
                wt = w.view(nb, o1 - o0, ck).transpose(1, 2)
                if o0 == 0:
                    torch.bmm(wt, gy_t, out=gc)
                else:
                    gc.baddbmm_(wt, gy_t)
            if need_gw:
                gw = gwbuf[: nb * n].view(nb, o1 - o0, ck)
                torch.bmm(gy_t, cols.transpose(1, 2), out=gw)
                gwf = gw.view(nb, n)
                first_b, first_o = b0 == 0, o0 == 0
                if compiled:  # the tile's gradient is complete after the last batch tile
                    source.grad_pass(gwf, pi[b0:b1], gdyn[:, lo:hi] if need_dyn else None, not first_b,
                                     b1 == batch, gpi[b0:b1] if need_pi else None, lo, hi)
                    continue
                if need_dyn:
                    gdyn[:, lo:hi].addmm_(pi[b0:b1].t(), gwf, beta=0.0 if first_b else 1.0)
                    if b1 == batch:  # this channel tile's gradient is complete: map it while in cache
                        source.map_grads(gdyn[:, lo:hi], lo, hi)
                if need_sta:
                    gsta[lo:hi].addmv_(gwf.t(), ones[b0:b1], beta=0.0 if first_b else 1.0)
                if need_pi:
                    gpi[b0:b1].addmm_(gwf, f.t(), beta=0.0 if first_o else 1.0)
        if need_x:
            gx[b0:b1] = col2im(gc, (nb, *x.shape[1:]), geom)
    if need_dyn and batch == 0:  # no tile ran: the zeros still go through the map
        source.map_grads(gdyn, 0, o * ck)
    return (
        gx,
        gpi,
        gdyn.view(k, *source.kernel_shape) if need_dyn else None,
        gsta.view_as(sta) if need_sta else None,
    )


__all__ = ["WeightSpaceBMM", "bmm_backward"]
