"""Custom autograd function of the tiled weight-space GEMM conv (``groups == 1``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .bmm_kernels import bmm_tiled_forward, tiles
from .geometry import ConvGeometry
from .im2col import col2im, im2col_workspace
from .workspace import workspace


class WeightSpaceBMM(torch.autograd.Function):
    """``y = conv(x_b, pi_b @ dyn + sta)`` per sample, forward and backward tile by tile.

    Backward per (batch tile, output-channel tile): recompute the tile's
    per-sample kernels and unfolded input, then
    ``gcols += W^T gy`` (input gradient, folded back per batch tile),
    ``gW = gy cols^T`` reduced at once into ``gdyn += pi^T gW``,
    ``gsta += sum_b gW`` and ``gpi += gW dyn^T`` while still in cache, so the
    per-sample kernels and their gradients never travel through main memory.
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


def bmm_backward(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry, gy: Tensor,
                 need_x: bool, need_pi: bool, need_dyn: bool, need_sta: bool):
    """Gradients ``(gx, gpi, gdyn, gsta)`` of the tiled weight-space conv (``None`` where not needed)."""
    need_sta = need_sta and sta is not None
    batch = x.shape[0]
    k, o = dyn.shape[0], dyn.shape[1]
    ck = dyn[0, 0].numel()
    ho, wo = geom.out_hw(x.shape[-2:])
    pixels = ho * wo
    gy = gy.reshape(batch, o, pixels).contiguous()
    dflat = dyn.reshape(k, o * ck)
    sflat = None if sta is None else sta.reshape(o * ck)
    pi = pi.to(dflat.dtype)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    # written by the first batch tile (gdyn, gsta) / output-channel tile (gpi), accumulated by later ones:
    # no zero-filling pass over the K weight-sized gradient
    # (an empty batch writes nothing: zeros then)
    alloc = torch.Tensor.new_zeros if batch == 0 else torch.Tensor.new_empty
    gdyn = alloc(dyn, (k, o * ck)) if need_dyn else None
    gsta = alloc(dyn, (o * ck,)) if need_sta else None
    gpi = alloc(pi, (batch, k)) if need_pi else None
    need_gw = need_pi or need_dyn or need_sta
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
            n = (o1 - o0) * ck
            gy_t = gy[b0:b1, o0:o1]
            if need_x:
                w = wbuf[: nb * n].view(nb, n)
                if sflat is None:
                    torch.mm(pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
                else:
                    torch.addmm(sflat[o0 * ck : o1 * ck], pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
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
                if need_dyn:
                    gdyn[:, o0 * ck : o1 * ck].addmm_(pi[b0:b1].t(), gwf, beta=0.0 if first_b else 1.0)
                if need_sta:
                    gsta[o0 * ck : o1 * ck].addmv_(gwf.t(), ones[b0:b1], beta=0.0 if first_b else 1.0)
                if need_pi:
                    gpi[b0:b1].addmm_(gwf, dflat[:, o0 * ck : o1 * ck].t(), beta=0.0 if first_o else 1.0)
        if need_x:
            gx[b0:b1] = col2im(gc, (nb, *x.shape[1:]), geom)
    return (
        gx,
        gpi,
        gdyn.view_as(dyn) if need_dyn else None,
        gsta.view_as(sta) if need_sta else None,
    )


__all__ = ["WeightSpaceBMM", "bmm_backward"]
