"""Weight-space convolution as batched GEMM: kernel aggregation, tile sizes and the forward kernels.

Per tile of (samples x output channels) the per-sample kernels are aggregated
with one ``addmm`` (``sta + pi @ dyn``) into a small buffer that stays in cache
and is immediately consumed by one ``bmm`` against the unfolded input, so the
``B x`` sized per-sample kernels never travel through main memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import ConvGeometry
from .im2col import im2col, im2col_workspace
from .workspace import workspace

# Tile budgets, in bytes: the per-tile aggregated kernels (``bc * oc * C*kh*kw`` values) and the
# per-tile unfolded input (``bc * C*kh*kw * L``). Chosen by measurement (docs/benchmarks.md);
# tests shrink them to exercise tiling.
TILE_BUDGET = {"weights": 96 << 20, "cols": 24 << 20}


def aggregate_kernels(pi: Tensor, dyn: Tensor, sta: Tensor | None) -> Tensor:
    """Per-sample kernels ``[B, *kernel_shape]`` = ``pi [B, K] @ dyn [K, *kernel_shape] (+ sta)`` as one GEMM."""
    k = dyn.shape[0]
    flat = dyn.reshape(k, -1)
    w = pi @ flat if sta is None else torch.addmm(sta.reshape(-1), pi, flat)
    return w.reshape(-1, *dyn.shape[1:])


def tiles(batch: int, out_channels: int, ck: int, pixels: int, itemsize: int) -> tuple[int, int]:
    """``(samples, output channels)`` per tile (see :data:`TILE_BUDGET`); ``ck = C/groups * kh * kw``."""
    bc = max(1, min(batch, TILE_BUDGET["cols"] // max(1, ck * pixels * itemsize)))
    oc = max(1, min(out_channels, TILE_BUDGET["weights"] // max(1, bc * ck * itemsize)))
    return bc, oc


def bmm_plain(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry) -> Tensor:
    """Untiled, autograd- and export-friendly weight-space GEMM (also the grouped case). ``[B, O, H', W']``."""
    cols, (ho, wo) = im2col(x, geom)
    o = dyn.shape[1]
    g = geom.groups
    w = aggregate_kernels(pi, dyn, sta)  # [B, O, Cg, kh, kw]
    if g == 1:
        y = torch.matmul(w.flatten(2), cols)  # [B, O, L]
    else:
        w = w.reshape(w.shape[0], g, o // g, -1)
        y = torch.matmul(w, cols.unflatten(1, (g, -1)))  # [B, G, Og, L]
    return y.reshape(y.shape[0], o, ho, wo)


def bmm_tiled_forward(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry) -> Tensor:
    """No-autograd tiled forward (``groups == 1``): per batch tile one im2col, per channel tile one addmm + bmm.

    All temporaries are tile-sized and come from the per-thread workspace.
    Returns ``[B, O, H', W']``.
    """
    batch = x.shape[0]
    k, o = dyn.shape[0], dyn.shape[1]
    ck = dyn[0, 0].numel()
    ho, wo = geom.out_hw(x.shape[-2:])
    pixels = ho * wo
    dflat = dyn.reshape(k, o * ck)
    sflat = None if sta is None else sta.reshape(o * ck)
    pi = pi.to(dflat.dtype)
    bc, oc = tiles(batch, o, ck, pixels, x.element_size())
    out = x.new_empty(batch, o, ho, wo)  # returned as allocated: never a view (in-place ops on it stay legal)
    y = out.view(batch, o, pixels)
    wbuf = workspace(0, min(bc * oc, batch * o) * ck, x)
    for b0 in range(0, batch, bc):
        b1 = min(batch, b0 + bc)
        nb = b1 - b0
        cols = im2col_workspace(x[b0:b1], geom)
        for o0 in range(0, o, oc):
            o1 = min(o, o0 + oc)
            w = wbuf[: nb * (o1 - o0) * ck].view(nb, (o1 - o0) * ck)
            if sflat is None:
                torch.mm(pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
            else:
                torch.addmm(sflat[o0 * ck : o1 * ck], pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
            torch.bmm(w.view(nb, o1 - o0, ck), cols, out=y[b0:b1, o0:o1])
    return out


__all__ = ["TILE_BUDGET", "aggregate_kernels", "bmm_plain", "bmm_tiled_forward", "tiles"]
