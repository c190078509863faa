"""im2col / col2im for the weight-space GEMM backends (row order ``(c, i, j)`` as in conv weights)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import ConvGeometry
from .workspace import workspace


def im2col(x: Tensor, geom: ConvGeometry) -> tuple[Tensor, tuple[int, int]]:
    """Unfold ``x [B, C, H, W]`` to ``(cols [B, C*kh*kw, L], (H', W'))`` with ``L = H' * W'``.

    Uses ``kh * kw`` strided slices of the padded input stacked once (no
    index tensors), so it traces and exports with a symbolic batch size.
    """
    ho, wo = geom.out_hw(x.shape[-2:])
    sh, sw = geom.stride
    if geom.pointwise:
        xs = x if (sh, sw) == (1, 1) else x[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw]
        return xs.flatten(2), (ho, wo)
    pt, pb, pl, pr = geom.pad
    xp = F.pad(x, (pl, pr, pt, pb)) if (pt or pb or pl or pr) else x
    (kh, kw), (dh, dw) = geom.kernel, geom.dilation
    taps = [
        xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = torch.stack(taps, dim=2)  # [B, C, kh*kw, Ho, Wo]
    return cols.flatten(1, 2).flatten(2), (ho, wo)


def _native_module(x: Tensor):
    """The compiled kernel library (:mod:`.fused`) if it may serve this eager im2col, else ``None``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
        return None
    if torch.is_grad_enabled() and x.requires_grad:  # the workspace copy is never part of a graph
        return None
    from .fused import fused_enabled, load_fused  # (fused imports this module)

    return load_fused() if fused_enabled() else None


def im2col_workspace(x: Tensor, geom: ConvGeometry, slot: int = 3) -> Tensor:
    """Eager :func:`im2col` into a reused workspace buffer (one pass, no page faults).

    Returns ``[B, C*kh*kw, L]``; valid until the next call that uses the same slot.
    Float32/float64 CPU inputs go through the C++ ``im2col`` of the compiled kernel
    library when :mod:`.fused` may load it (``PADNET_FUSED``), else one strided copy.
    """
    ho, wo = geom.out_hw(x.shape[-2:])
    if geom.pointwise and geom.stride == (1, 1):
        return x.flatten(2) if x.is_contiguous() else x.reshape(x.shape[0], x.shape[1], -1)
    pt, pb, pl, pr = geom.pad
    (kh, kw), (dh, dw), (sh, sw) = geom.kernel, geom.dilation, geom.stride
    b, c = x.shape[0], x.shape[1]
    module = _native_module(x)
    if module is not None:  # the C++ im2col: one pass, no padded copy (3-4x faster on narrow deep layers)
        out = workspace(slot, b * c * kh * kw * ho * wo, x)
        module.im2col(x, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, out)
        return out.view(b, c * kh * kw, ho * wo)
    xp = F.pad(x, (pl, pr, pt, pb)) if (pt or pb or pl or pr) else x
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((b, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3), xp.storage_offset())
    out = workspace(slot, b * c * kh * kw * ho * wo, x).view(b, c, kh, kw, ho, wo)
    out.copy_(view)
    return out.view(b, c * kh * kw, ho * wo)


def col2im(gcols: Tensor, x_shape, geom: ConvGeometry) -> Tensor:
    """Adjoint of :func:`im2col`: ``[B, C*kh*kw, L]`` -> ``[B, C, H, W]`` (overlaps summed)."""
    b, c, h, w = x_shape
    ho, wo = geom.out_hw((h, w))
    sh, sw = geom.stride
    if geom.pointwise:
        g = gcols.reshape(b, c, ho, wo)
        if (sh, sw) == (1, 1):
            return g
        gx = gcols.new_zeros(b, c, h, w)
        gx[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw] = g
        return gx
    pt, pb, pl, pr = geom.pad
    (kh, kw), (dh, dw) = geom.kernel, geom.dilation
    g = gcols.reshape(b, c, kh * kw, ho, wo)
    gxp = gcols.new_zeros(b, c, h + pt + pb, w + pl + pr)
    t = 0
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw] += g[:, :, t]
            t += 1
    return gxp[:, :, pt : pt + h, pl : pl + w]


__all__ = ["col2im", "im2col", "im2col_workspace"]
