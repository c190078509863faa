"""Weight-space convolution as batched GEMM: kernel aggregation, tile sizes and the forward kernels.

Per tile of (samples x output channels) the per-sample kernels are aggregated
(``sta + pi @ dyn``: one ``addmm``, or without a static part the compiled
``mix_factors`` of :mod:`.fused` where the library is built) into a tile
buffer that is immediately consumed by one ``bmm`` against the unfolded input,
so the ``B x`` sized per-sample kernels are never materialised whole. The
factors come from a *factor source* (:class:`StoredFactors`, or one that forms
them per tile, :class:`.masked_factors.ElementFactors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import fused_enabled, load_fused
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


# factors per call of the compiled factor GEMMs (their accumulators live on the stack)
_COMPILED_MAX_FACTORS = 64


def compiled_factor_gemms(dtype: torch.dtype, device: torch.device, rows: int):
    """The compiled module of :mod:`.fused` if its factor GEMMs (``mix_factors``, ``factor_grad_pass``)
    serve these factors (CPU, float32/float64, at most 64 of them, ``PADNET_FUSED`` not off, a build
    available), else ``None`` (MKL's GEMMs serve)."""
    if (device.type != "cpu" or dtype not in (torch.float32, torch.float64) or rows > _COMPILED_MAX_FACTORS
            or not fused_enabled()):
        return None
    module = load_fused()
    return module if module is not None and hasattr(module, "factor_grad_pass") else None


class StoredFactors:
    """A stored factor matrix ``dyn [K, O, *]`` seen as ``[K, P]`` and handed out by column range.

    The tiled kernels work on a factor source one tile of columns at a time:

    - ``columns(lo, hi)`` (``[rows, hi - lo]``) and ``map_grads(g, lo, hi)`` (a completed tile of
      the factors' gradient) for MKL's GEMMs;
    - where ``compiled`` is set, ``mix(pi, lo, hi, out)`` (``out = pi @ F[:, lo:hi]``) and
      ``grad_pass(gw, pi, g, accumulate, last, gpi, lo, hi)`` (``g (+)= pi^T gw``, ``gpi += gw F^T``
      in one pass over ``gw``; ``last``: the tile's gradient is complete), the compiled kernels.

    So a source that forms its factors (:class:`.masked_factors.ElementFactors`) can do it tile by
    tile, or inside the kernels. Stored factors are views and need no mapping.
    """

    def __init__(self, dyn: Tensor) -> None:
        self.rows = dyn.shape[0]
        self.dtype = dyn.dtype
        self.kernel_shape = tuple(dyn.shape[1:])
        self.out_channels = dyn.shape[1]
        self.numel = dyn[0].numel()
        self._flat = dyn.detach().reshape(self.rows, self.numel)
        self.compiled = compiled_factor_gemms(dyn.dtype, dyn.device, self.rows)

    def columns(self, lo: int, hi: int) -> Tensor:
        return self._flat[:, lo:hi]

    def map_grads(self, g: Tensor, lo: int, hi: int) -> None:
        return None

    def mix(self, pi: Tensor, lo: int, hi: int, out: Tensor) -> None:
        self.compiled.mix_factors(pi, self._flat[:, lo:hi], None, None, 0.0, 0.0, out)

    def grad_pass(self, gw: Tensor, pi: Tensor, g: Tensor | None, accumulate: bool, last: bool,
                  gpi: Tensor | None, lo: int, hi: int) -> None:
        self.compiled.factor_grad_pass(gw, pi, self._flat[:, lo:hi], None, None, 0.0, 0.0, g, accumulate, False,
                                       True, gpi, None)


def factor_source(dyn):
    """``dyn`` as a factor source: a tensor ``[K, O, *]`` becomes :class:`StoredFactors`; a source stays."""
    return StoredFactors(dyn) if isinstance(dyn, Tensor) else dyn


def bmm_tiled_forward(x: Tensor, pi: Tensor, dyn, sta: Tensor | None, geom: ConvGeometry) -> Tensor:
    """No-autograd tiled forward (``groups == 1``): per batch tile one im2col, per channel tile one addmm + bmm.

    ``dyn``: the factors ``[K, O, C, kh, kw]`` or a factor source (:class:`StoredFactors`), whose
    columns are formed per channel tile. All temporaries are tile-sized and come from the
    per-thread workspace. Returns ``[B, O, H', W']``.
    """
    source = factor_source(dyn)
    compiled = source.compiled is not None and sta is None
    batch = x.shape[0]
    o = source.out_channels
    ck = source.numel // o
    ho, wo = geom.out_hw(x.shape[-2:])
    pixels = ho * wo
    sflat = None if sta is None else sta.reshape(o * ck)
    pi = pi.to(source.dtype)
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
            if compiled:
                source.mix(pi[b0:b1], o0 * ck, o1 * ck, w)
            elif sflat is None:
                torch.mm(pi[b0:b1], source.columns(o0 * ck, o1 * ck), out=w)
            else:
                torch.addmm(sflat[o0 * ck : o1 * ck], pi[b0:b1], source.columns(o0 * ck, o1 * ck), out=w)
            torch.bmm(w.view(nb, o1 - o0, ck), cols, out=y[b0:b1, o0:o1])
    return out


__all__ = ["TILE_BUDGET", "StoredFactors", "aggregate_kernels", "bmm_plain", "bmm_tiled_forward",
           "compiled_factor_gemms", "factor_source", "tiles"]
