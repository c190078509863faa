"""Functional dynamic convolution: ``y_b = conv(x_b, sum_k pi_bk dyn_k + sta) + bias_b``.

Both the trainable :class:`~padnet.layers.DynamicConv2d` and its deploy form
call :func:`dynamic_conv2d` with already combined factors (mask and scales
folded in), so every backend is written once. ``sta`` may be ``None`` (no
static part: a fully dynamic layer, or the dynamic rows of a channel split).

Backends (all compute the same function; tests check them against a
per-sample reference in float64, gradients included):

- ``"weight"``: aggregate one kernel per sample, then one grouped convolution
  with ``groups = B * groups`` (the classic DY-Conv / CondConv implementation,
  kept as the peer baseline and as the algorithmic form FLOP counting uses).
- ``"bmm"``: weight space as batched GEMM. The input is unfolded once
  (im2col by ``kh * kw`` strided slices, export-friendly), then per tile of
  (samples x output channels) the per-sample kernels are aggregated with one
  ``addmm`` (``sta + pi @ dyn``) into a small buffer that stays in cache and
  immediately consumed by one ``bmm``. A custom autograd function runs the
  backward tile by tile too (kernel gradients are reduced into ``dyn``, ``sta``
  and ``pi`` while still in cache), so the ``B x`` sized per-sample kernels and
  their gradients never travel through main memory.
- ``"output"``: run the K dynamic kernels and the static kernel as one static
  convolution with ``(K + 1) * O`` output channels, then mix the K outputs with
  the routing weights. ``K + 1`` times the FLOPs, but one large conv; wins only
  when the per-sample kernels are huge relative to the work done with them.
- ``"auto"``: :func:`select_backend` (a measured cost rule), or, with
  ``PADNET_AUTOTUNE=1`` / :func:`set_autotune`, a one-time cached
  micro-benchmark per (shape, batch, dtype, device, grad mode).

:func:`channel_split_conv2d` serves channel-structured PAD masks: a plain conv
for the static output channels plus a dynamic conv for the dynamic ones only.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

BACKENDS = ("auto", "weight", "bmm", "output")
CONCRETE_BACKENDS = ("weight", "bmm", "output")

# Tile budgets of the "bmm" backend, in bytes: the per-tile aggregated kernels
# (``bc * oc * C*kh*kw`` values) and the per-tile unfolded input (``bc * C*kh*kw * L``).
# Chosen by measurement (docs/benchmarks.md); tests shrink them to exercise tiling.
TILE_BUDGET = {"weights": 96 << 20, "cols": 24 << 20}

# Tile buffers come from a per-thread workspace that is reused across calls:
# freshly allocated buffers this large are mmap'ed and page-faulted in on every
# call (measured: ~1x a static conv at 256@8, batch 32). Buffers above the
# limit are allocated per call instead. ``release_workspace()`` frees it.
WORKSPACE_LIMIT = int(os.environ.get("PADNET_WORKSPACE_MB", "192")) << 20
_WORKSPACE = threading.local()


def _workspace(slot: int, numel: int, like: Tensor) -> Tensor:
    """A flat scratch tensor of ``numel`` elements (dtype/device of ``like``), reused across calls."""
    nbytes = numel * like.element_size()
    if nbytes > WORKSPACE_LIMIT or like.device.type != "cpu":
        return like.new_empty(numel)
    store = getattr(_WORKSPACE, "buffers", None)
    if store is None:
        store = _WORKSPACE.buffers = {}
    key = (slot, like.dtype)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = like.new_empty(numel)
        store[key] = buf
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's cached scratch buffers of the ``"bmm"`` backend."""
    _WORKSPACE.buffers = {}

# Channel split (CPU): CHANNEL_ALIGN pads both parts with zero output channels to a multiple of
# it; off (1) by default: a plain conv with 90 vs 96 outputs measured neutral on a quiet machine
# once the padding copy is paid (benchmarks/bench_micro.py).
CHANNEL_ALIGN = 1

# Cost-rule constants (CPU), see select_backend and docs/benchmarks.md.
_GROUPED_MIN_L = 256  # output pixels per sample from which the grouped conv beats bmm
_OUTPUT_MAX_L = 16  # per-sample GEMM width at or below which (K+1)x FLOPs beat streaming B kernels ...
_OUTPUT_MIN_COLUMNS = 256  # ... once the output-space conv has B * L >= this many columns to be efficient


# --------------------------------------------------------------------------------------------
# export / tracing detection
# --------------------------------------------------------------------------------------------

_EXPORT_DEPTH = 0


@contextmanager
def export_mode() -> Iterator[None]:
    """Within this context every padnet layer uses its export-friendly path.

    Dynamic convs avoid batch-dependent attributes (``groups = B``), Python
    loops over samples and ``out=`` buffers; MoE dispatch computes all experts
    densely and gates with the top-k mask (no data-dependent shapes).
    :mod:`padnet.io.exporters` enters it automatically; torch.export / ONNX / JIT
    tracing are also detected on their own.
    """
    global _EXPORT_DEPTH
    _EXPORT_DEPTH += 1
    try:
        yield
    finally:
        _EXPORT_DEPTH -= 1


def is_exporting() -> bool:
    """True inside :func:`export_mode`, torch.export / dynamo tracing, ONNX export or JIT tracing."""
    if _EXPORT_DEPTH > 0:
        return True
    try:
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover - very old torch
        pass
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover
        return False


# --------------------------------------------------------------------------------------------
# backend selection: rule + optional cached micro-benchmark
# --------------------------------------------------------------------------------------------

_AUTOTUNE: bool | None = None  # None: read PADNET_AUTOTUNE
_AUTOTUNE_CACHE: dict[tuple, str] = {}


def set_autotune(enabled: bool | None) -> None:
    """Enable / disable the cached micro-benchmark of ``backend="auto"``.

    ``None`` restores the default: the ``PADNET_AUTOTUNE`` environment variable
    (``1`` enables; unset or ``0`` keeps the deterministic cost rule).
    """
    global _AUTOTUNE
    _AUTOTUNE = enabled


def autotune_enabled() -> bool:
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("PADNET_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def clear_autotune_cache() -> None:
    _AUTOTUNE_CACHE.clear()


def autotune_cache() -> dict[tuple, str]:
    """A copy of the cached choices: key ``(shape..., batch, dtype, device, grad)`` -> backend."""
    return dict(_AUTOTUNE_CACHE)


def select_backend(
    backend: str,
    batch_size: int,
    num_kernels: int,
    out_channels: int,
    groups: int,
    *,
    in_channels: int | None = None,
    kernel_numel: int | None = None,
    out_pixels: int | None = None,
    device: torch.device | str | None = None,
    exporting: bool = False,
    requires_grad: bool = False,
) -> str:
    """Resolve ``"auto"`` to a concrete backend by a measured cost rule (explicit names pass through).

    Let ``L`` be the output pixels per sample and ``P`` the size of one kernel.
    Weight space costs one conv worth of FLOPs (``1 + K/L`` with the
    aggregation) but streams ``B * P`` per-sample kernel values through a GEMM
    only ``L`` columns wide; output space costs ``K (+1)`` convs of FLOPs but
    runs them as one large, cache-friendly conv. On CPU (docs/benchmarks.md):

    - Batch 1: ``"weight"`` (the aggregated kernel is one plain conv weight).
    - Depthwise (``groups == out_channels``): ``"weight"`` (grouped depthwise
      kernels; per-sample GEMMs of width 1 would starve ``bmm``).
    - ``L >= _GROUPED_MIN_L`` (256) or grouped convs: ``"weight"`` -- small
      kernels, wide GEMMs; the grouped conv avoids im2col traffic (9x the input).
    - ``L <= _OUTPUT_MAX_L`` (16) and ``B * L >= _OUTPUT_MIN_COLUMNS`` (256),
      inference: ``"output"`` -- per-sample GEMMs 16 wide run at a fraction of
      peak while streaming ``B * P`` kernels; ``K`` convs over ``B * L`` columns
      win (512@4 at batch 32: 4.8x vs 6.4x a static conv; 30% of its channels:
      1.3x vs 2.2x). At batch 8 the ``K``-fold conv is too narrow: ``"bmm"``
      (4.9x vs 6.9x). With autograd ``"bmm"``: output space pays ``K + 1``
      convs again in both backward convs.
    - Otherwise: ``"bmm"`` (cache-tiled per-sample GEMMs).
    - CUDA: ``"weight"`` (cuDNN grouped conv; not re-measured in this project).
    - Exporting: never ``"weight"`` (``groups = B`` would freeze the batch size):
      ``"output"`` for depthwise / thin layers, else ``"bmm"`` (untiled).
    """
    if backend != "auto":
        return backend
    depthwise = groups > 1 and groups == out_channels
    if exporting:
        if depthwise or (out_pixels is not None and out_pixels <= _OUTPUT_MAX_L):
            return "output"
        return "bmm"
    if batch_size == 1 or depthwise:
        return "weight"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return "weight"
    if out_pixels is None:  # legacy call without geometry: the old rule
        return "output"
    if out_pixels <= _OUTPUT_MAX_L:
        if groups == 1 and requires_grad:
            return "bmm"
        if groups == 1 and batch_size * out_pixels < _OUTPUT_MIN_COLUMNS:
            return "bmm"
        return "output"
    if out_pixels >= _GROUPED_MIN_L or groups > 1:
        return "weight"
    return "bmm"


def _autotune_key(x, pi, dyn, sta, stride, padding, dilation, groups) -> tuple:
    return (
        tuple(dyn.shape), sta is not None, tuple(x.shape[1:]), _pair(stride), str(padding), _pair(dilation),
        groups, int(x.shape[0]), str(x.dtype), str(x.device), torch.is_grad_enabled(),
    )


def _autotune(x, pi, dyn, sta, stride, padding, dilation, groups, repeats: int = 3) -> str:
    key = _autotune_key(x, pi, dyn, sta, stride, padding, dilation, groups)
    hit = _AUTOTUNE_CACHE.get(key)
    if hit is not None:
        return hit
    grad = torch.is_grad_enabled()
    candidates = list(CONCRETE_BACKENDS)
    if groups > 1 and groups == dyn.shape[1]:
        candidates.remove("bmm")  # width-1 GEMMs: never competitive, skip the slow trial
    xs = x.detach().requires_grad_(grad)
    pis = pi.detach().requires_grad_(grad)
    dyns = dyn.detach().requires_grad_(grad)
    stas = None if sta is None else sta.detach().requires_grad_(grad)
    timings = {}
    for name in candidates:
        def run():
            y = _dispatch(name, xs, pis, dyns, stas, stride, padding, dilation, groups)
            if grad:
                y.backward(torch.ones_like(y))
        run()  # warm-up (allocator, mkldnn primitive caches)
        times = []
        for _ in range(repeats):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            run()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
        timings[name] = sorted(times)[len(times) // 2]
    choice = min(timings, key=timings.get)
    _AUTOTUNE_CACHE[key] = choice
    return choice


def resolve_backend(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, stride, padding, dilation,
                    groups: int, backend: str = "auto") -> str:
    """Concrete backend for this call (rule, autotune cache, export mode)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    exporting = is_exporting()
    if exporting and backend == "weight":
        backend = "auto"  # groups = B cannot be exported with a dynamic batch axis
    if backend != "auto":
        return backend
    if not exporting and autotune_enabled() and x.shape[0] > 1:
        return _autotune(x, pi, dyn, sta, stride, padding, dilation, groups)
    kh, kw = dyn.shape[-2:]
    ho, wo = _out_hw(x.shape[-2:], (kh, kw), _pair(stride), _padding4(padding, (kh, kw), _pair(dilation)),
                     _pair(dilation))
    requires_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pi, dyn, sta))
    return select_backend(
        "auto", int(x.shape[0]) if not exporting else 2, dyn.shape[0], dyn.shape[1], groups,
        in_channels=x.shape[1], kernel_numel=kh * kw, out_pixels=ho * wo, device=x.device, exporting=exporting,
        requires_grad=requires_grad,
    )


# --------------------------------------------------------------------------------------------
# geometry helpers and im2col
# --------------------------------------------------------------------------------------------


def _padding4(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` for an int / pair / ``"same"`` / ``"valid"`` padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            out = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return out[0], out[1], out[2], out[3]
        raise ValueError(f"unknown padding {padding!r}")
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def _out_hw(hw, kernel_size, stride, pad4, dilation) -> tuple[int, int]:
    h, w = int(hw[0]), int(hw[1])
    ho = (h + pad4[0] + pad4[1] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + pad4[2] + pad4[3] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return ho, wo


class _Geometry:
    """Conv hyper-parameters resolved once per call."""

    __slots__ = ("kernel", "stride", "pad", "dilation", "groups")

    def __init__(self, kernel, stride, padding, dilation, groups):
        self.kernel = (int(kernel[0]), int(kernel[1]))
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.pad = _padding4(padding, self.kernel, self.dilation)
        self.groups = int(groups)

    def out_hw(self, hw) -> tuple[int, int]:
        return _out_hw(hw, self.kernel, self.stride, self.pad, self.dilation)

    @property
    def pointwise(self) -> bool:
        return self.kernel == (1, 1) and not any(self.pad) and self.dilation == (1, 1)


def im2col(x: Tensor, geom: _Geometry) -> tuple[Tensor, tuple[int, int]]:
    """Unfold ``x [B, C, H, W]`` to ``cols [B, C*kh*kw, L]`` (row order ``(c, i, j)`` as in conv weights).

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


def _im2col_workspace(x: Tensor, geom: _Geometry, slot: int = 3) -> Tensor:
    """Eager :func:`im2col` into a reused workspace buffer (one strided copy, no page faults).

    Returns ``[B, C*kh*kw, L]``; valid until the next call that uses the same slot.
    """
    ho, wo = geom.out_hw(x.shape[-2:])
    if geom.pointwise and geom.stride == (1, 1):
        return x.flatten(2) if x.is_contiguous() else x.reshape(x.shape[0], x.shape[1], -1)
    pt, pb, pl, pr = geom.pad
    xp = F.pad(x, (pl, pr, pt, pb)) if (pt or pb or pl or pr) else x
    (kh, kw), (dh, dw), (sh, sw) = geom.kernel, geom.dilation, geom.stride
    b, c = x.shape[0], x.shape[1]
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((b, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3), xp.storage_offset())
    out = _workspace(slot, b * c * kh * kw * ho * wo, x).view(b, c, kh, kw, ho, wo)
    out.copy_(view)
    return out.view(b, c * kh * kw, ho * wo)


def col2im(gcols: Tensor, x_shape, geom: _Geometry) -> Tensor:
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


def _tiles(batch: int, out_channels: int, ck: int, pixels: int, itemsize: int) -> tuple[int, int]:
    """``(samples, output channels)`` per tile of the bmm backend (see :data:`TILE_BUDGET`)."""
    bc = max(1, min(batch, TILE_BUDGET["cols"] // max(1, ck * pixels * itemsize)))
    oc = max(1, min(out_channels, TILE_BUDGET["weights"] // max(1, bc * ck * itemsize)))
    return bc, oc


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def mix_bias(pi: Tensor, bias_dyn: Tensor | None, bias_sta: Tensor | None) -> Tensor | None:
    """Per-sample bias ``[B, O]`` = ``pi @ bias_dyn + bias_sta``, or ``None``."""
    if bias_dyn is None:
        return bias_sta if bias_sta is None else bias_sta.expand(pi.shape[0], -1)
    if bias_sta is None:
        return pi @ bias_dyn
    return torch.addmm(bias_sta, pi, bias_dyn)


def dynamic_conv2d(
    x: Tensor,
    pi: Tensor,
    dyn: Tensor,
    sta: Tensor | None,
    bias_dyn: Tensor | None = None,
    bias_sta: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Dynamic convolution with per-sample kernels.

    Args:
        x: ``[B, C, H, W]`` input.
        pi: ``[B, K]`` routing weights.
        dyn: ``[K, O, C/groups, kh, kw]`` combined dynamic factors.
        sta: ``[O, C/groups, kh, kw]`` combined static part, or ``None`` (zero).
        bias_dyn: ``[K, O]`` or ``None``; bias_sta: ``[O]`` or ``None``.
        backend: one of :data:`BACKENDS`.
    Returns:
        ``[B, O, H', W']``.
    """
    backend = resolve_backend(x, pi, dyn, sta, stride, padding, dilation, groups, backend)
    y = _dispatch(backend, x, pi, dyn, sta, stride, padding, dilation, groups)
    if bias_dyn is not None:
        y = y + mix_bias(pi, bias_dyn, bias_sta)[:, :, None, None]
    elif bias_sta is not None:
        y = y + bias_sta[:, None, None]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def _dispatch(backend, x, pi, dyn, sta, stride, padding, dilation, groups) -> Tensor:
    if backend == "weight":
        return _weight_space(x, pi, dyn, sta, stride, padding, dilation, groups)
    if backend == "bmm":
        return _weight_space_bmm(x, pi, dyn, sta, _Geometry(dyn.shape[-2:], stride, padding, dilation, groups))
    if backend == "output":
        return _output_space(x, pi, dyn, sta, stride, padding, dilation, groups)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def channel_split_runs_dense(x: Tensor, pi: Tensor, dyn_rows: Tensor, stride, padding, dilation, groups: int,
                             backend: str = "auto") -> bool:
    """Whether :func:`channel_split_conv2d` runs the whole layer as one dynamic conv instead of splitting.

    True where the dynamic part would run as a grouped conv of per-sample kernels
    (``groups == 1``, batch > 1, ``backend`` resolving to ``"weight"``, not exporting).
    """
    if groups != 1 or x.shape[0] == 1 or is_exporting():
        return False
    return resolve_backend(x, pi, dyn_rows, None, stride, padding, dilation, 1, backend) == "weight"


def _add_channel_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """``y [B, O, H, W]`` plus a ``[O]`` or per-sample ``[B, O]`` bias."""
    if bias is None:
        return y
    return y + (bias[:, None, None] if bias.dim() == 1 else bias[:, :, None, None])


def channel_split_conv2d(
    x: Tensor,
    pi: Tensor,
    dyn_rows: Tensor,
    sta_rows: Tensor,
    order: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
    static_in_index: Tensor | None = None,
    dynamic_in_index: Tensor | None = None,
    align: int | None = None,
) -> Tensor:
    """Convolution whose output channels are either fully static or fully dynamic.

    Args:
        dyn_rows: ``[K, Od, C/groups, kh, kw]`` kernels of the dynamic channels (scales folded).
        sta_rows: ``[Os, C/groups, kh, kw]`` plain conv weight of the static channels.
        order: long ``[O]``; output channel ``o`` is column ``order[o]`` of
            ``cat([static_out, dynamic_out], dim=1)``.
        bias: ``[O]`` static bias, ``[B, O]`` per-sample bias, or ``None``.
        groups: 1, or depthwise (``groups == C == O``); then
            ``static_in_index`` / ``dynamic_in_index`` select the input channel
            of each static / dynamic output channel.
        align: pad the parts with zero output channels to a multiple of this
            (``groups == 1``); default :data:`CHANNEL_ALIGN` on CPU, off when exporting.

    Where the dynamic part would run as a grouped conv of per-sample kernels
    (``backend`` resolves to ``"weight"``: many output pixels per sample), the
    split is not worth it: the grouped conv of the *whole* layer costs about a
    static conv there, less than a static conv on 70 % of the channels plus a
    dynamic one on 30 % (docs/benchmarks.md). Then the static rows are placed
    into the dense factors and the whole layer runs as one dynamic conv.
    """
    if groups == 1 and x.shape[0] == 1 and not is_exporting():
        # one sample: assemble its whole kernel (static rows + mixed dynamic rows) and run one conv
        mixed = (pi @ dyn_rows.flatten(1)).view(dyn_rows.shape[1:])
        weight = torch.cat([sta_rows, mixed], dim=0).index_select(0, order)
        return _add_channel_bias(F.conv2d(x, weight, None, stride, padding, dilation), bias)
    if groups == 1:
        n_sta, n_dyn = sta_rows.shape[0], dyn_rows.shape[1]
        if channel_split_runs_dense(x, pi, dyn_rows, stride, padding, dilation, groups, backend):
            dyn = torch.cat([dyn_rows.new_zeros((dyn_rows.shape[0], n_sta, *dyn_rows.shape[2:])), dyn_rows],
                            dim=1).index_select(1, order)
            sta = torch.cat([sta_rows, sta_rows.new_zeros((n_dyn, *sta_rows.shape[1:]))]).index_select(0, order)
            y = dynamic_conv2d(x, pi, dyn, sta, None, None, stride, padding, dilation, 1, "weight")
            return _add_channel_bias(y, bias)
        if align is None:
            align = 1 if is_exporting() or x.device.type != "cpu" else CHANNEL_ALIGN
        if align > 1 and (n_sta % align or n_dyn % align):
            pad_sta, pad_dyn = -n_sta % align, -n_dyn % align
            sta_rows = F.pad(sta_rows, (0, 0) * (sta_rows.dim() - 1) + (0, pad_sta))
            dyn_rows = F.pad(dyn_rows, (0, 0) * (dyn_rows.dim() - 2) + (0, pad_dyn, 0, 0))
            order = order + (order >= n_sta).to(order.dtype) * pad_sta
        ys = F.conv2d(x, sta_rows, None, stride, padding, dilation)
        yd = dynamic_conv2d(x, pi, dyn_rows, None, stride=stride, padding=padding, dilation=dilation,
                            backend=backend)
    else:
        xs = x.index_select(1, static_in_index)
        xd = x.index_select(1, dynamic_in_index)
        ys = F.conv2d(xs, sta_rows, None, stride, padding, dilation, sta_rows.shape[0])
        yd = dynamic_conv2d(xd, pi, dyn_rows, None, stride=stride, padding=padding, dilation=dilation,
                            groups=dyn_rows.shape[1], backend=backend)
    y = _add_channel_bias(torch.cat([ys, yd], dim=1).index_select(1, order), bias)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------


def aggregate_kernels(pi: Tensor, dyn: Tensor, sta: Tensor | None) -> Tensor:
    """Per-sample kernels ``[B, *kernel_shape]`` = ``pi @ dyn (+ sta)`` as one GEMM."""
    k = dyn.shape[0]
    flat = dyn.reshape(k, -1)
    w = pi @ flat if sta is None else torch.addmm(sta.reshape(-1), pi, flat)
    return w.reshape(-1, *dyn.shape[1:])


def _weight_space(x, pi, dyn, sta, stride, padding, dilation, groups):
    batch, channels, height, width = x.shape
    kernel_shape = dyn.shape[1:]
    weight = aggregate_kernels(pi, dyn, sta)
    weight = weight.reshape(batch * kernel_shape[0], *kernel_shape[1:])
    y = F.conv2d(
        x.reshape(1, batch * channels, height, width), weight, None, stride, padding, dilation, batch * groups
    )
    return y.reshape(batch, kernel_shape[0], *y.shape[-2:])


def _output_space(x, pi, dyn, sta, stride, padding, dilation, groups):
    k, out_channels = dyn.shape[0], dyn.shape[1]
    parts = k + (0 if sta is None else 1)
    if groups == 1:
        weight = dyn.reshape(k * out_channels, *dyn.shape[2:])
        if sta is not None:
            weight = torch.cat([weight, sta], dim=0)
    else:
        # Keep each group's K(+1) kernels contiguous so one grouped conv serves all.
        per_group = out_channels // groups
        stack = dyn if sta is None else torch.cat([dyn, sta.unsqueeze(0)], dim=0)  # [parts, O, ...]
        stack = stack.reshape(parts, groups, per_group, *dyn.shape[2:]).transpose(0, 1)
        weight = stack.reshape(groups * parts * per_group, *dyn.shape[2:])
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    height, width = y.shape[-2:]
    if groups == 1:
        y = y.unflatten(1, (parts, out_channels))
    else:
        y = y.unflatten(1, (groups, parts, out_channels // groups)).transpose(1, 2).flatten(2, 3)
    mixed = torch.einsum("bk,bkohw->bohw", pi, y[:, :k])
    return mixed if sta is None else mixed + y[:, k]


def _weight_space_bmm(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: _Geometry) -> Tensor:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, pi, dyn, sta)
    )
    if is_exporting() or geom.groups > 1:
        return _bmm_plain(x, pi, dyn, sta, geom)
    if needs_grad:
        return _WeightSpaceBMM.apply(x, pi, dyn, sta, geom)
    with torch.no_grad():
        return _bmm_tiled_forward(x, pi, dyn, sta, geom)


def _bmm_plain(x, pi, dyn, sta, geom):
    """Untiled, autograd- and export-friendly weight-space GEMM (also the grouped case)."""
    cols, (ho, wo) = im2col(x, geom)
    k, o = dyn.shape[0], dyn.shape[1]
    g = geom.groups
    w = aggregate_kernels(pi, dyn, sta)  # [B, O, Cg, kh, kw]
    if g == 1:
        y = torch.matmul(w.flatten(2), cols)  # [B, O, L]
    else:
        w = w.reshape(w.shape[0], g, o // g, -1)
        y = torch.matmul(w, cols.unflatten(1, (g, -1)))  # [B, G, Og, L]
    return y.reshape(y.shape[0], o, ho, wo)


def _bmm_tiled_forward(x, pi, dyn, sta, geom):
    """No-autograd tiled forward: per batch tile one im2col, per output-channel tile one addmm + one bmm.

    All temporaries are tile-sized (:data:`TILE_BUDGET`), so they are reused
    from the heap instead of being page-faulted in on every call.
    """
    batch = x.shape[0]
    k, o = dyn.shape[0], dyn.shape[1]
    ck = dyn[0, 0].numel()
    ho, wo = geom.out_hw(x.shape[-2:])
    pixels = ho * wo
    dflat = dyn.reshape(k, o * ck)
    sflat = None if sta is None else sta.reshape(o * ck)
    pi = pi.to(dflat.dtype)
    bc, oc = _tiles(batch, o, ck, pixels, x.element_size())
    y = x.new_empty(batch, o, pixels)
    wbuf = _workspace(0, min(bc * oc, batch * o) * ck, x)
    for b0 in range(0, batch, bc):
        b1 = min(batch, b0 + bc)
        nb = b1 - b0
        cols = _im2col_workspace(x[b0:b1], geom)
        for o0 in range(0, o, oc):
            o1 = min(o, o0 + oc)
            w = wbuf[: nb * (o1 - o0) * ck].view(nb, (o1 - o0) * ck)
            if sflat is None:
                torch.mm(pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
            else:
                torch.addmm(sflat[o0 * ck : o1 * ck], pi[b0:b1], dflat[:, o0 * ck : o1 * ck], out=w)
            torch.bmm(w.view(nb, o1 - o0, ck), cols, out=y[b0:b1, o0:o1])
    return y.view(batch, o, ho, wo)


class _WeightSpaceBMM(torch.autograd.Function):
    """Tiled weight-space conv with a tiled backward (groups == 1).

    Backward per (batch tile, output-channel tile): recompute the tile's
    per-sample kernels and unfolded input, then
    ``gcols += W^T gy`` (input gradient, folded back per batch tile),
    ``gW = gy cols^T`` reduced at once into ``gdyn += pi^T gW``,
    ``gsta += sum_b gW`` and ``gpi += gW dyn^T`` while still in cache.
    """

    @staticmethod
    def forward(ctx, x, pi, dyn, sta, geom):
        ctx.geom = geom
        ctx.save_for_backward(x, pi, dyn, sta)
        return _bmm_tiled_forward(x, pi, dyn, sta, geom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, pi, dyn, sta = ctx.saved_tensors
        geom = ctx.geom
        need_x, need_pi, need_dyn, need_sta = ctx.needs_input_grad[:4]
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
        gdyn = dyn.new_zeros(k, o * ck) if need_dyn else None
        gsta = dyn.new_zeros(o * ck) if need_sta else None
        gpi = pi.new_zeros(batch, k) if need_pi else None
        need_gw = need_pi or need_dyn or need_sta
        ones = pi.new_ones(batch) if need_sta else None
        bc, oc = _tiles(batch, o, ck, pixels, x.element_size())
        tile = min(bc * oc, batch * o) * ck
        wbuf = _workspace(0, tile, x) if need_x else None
        gwbuf = _workspace(1, tile, x) if need_gw else None
        gcols = _workspace(2, min(bc, batch) * ck * pixels, x).view(min(bc, batch), ck, pixels) if need_x else None
        for b0 in range(0, batch, bc):
            b1 = min(batch, b0 + bc)
            nb = b1 - b0
            cols = _im2col_workspace(x[b0:b1], geom) if need_gw else None
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
                    if need_dyn:
                        gdyn[:, o0 * ck : o1 * ck].addmm_(pi[b0:b1].t(), gwf)
                    if need_sta:
                        gsta[o0 * ck : o1 * ck].addmv_(gwf.t(), ones[b0:b1])
                    if need_pi:
                        gpi[b0:b1].addmm_(gwf, dflat[:, o0 * ck : o1 * ck].t())
            if need_x:
                gx[b0:b1] = col2im(gc, (nb, *x.shape[1:]), geom)
        return (
            gx,
            gpi,
            gdyn.view_as(dyn) if need_dyn else None,
            gsta.view_as(sta) if need_sta else None,
            None,
        )


def flops_ratio(batch: int, num_kernels: int, out_pixels: int, with_static: bool = True) -> dict[str, float]:
    """Multiply-adds of each backend relative to a static conv of the same shape.

    Weight space: ``1 + (K + s) / L`` (aggregation of B kernels amortised over L
    pixels, ``s = 1`` with a static part); output space: ``K + s``.
    """
    s = 1 if with_static else 0
    return {
        "weight": 1.0 + (num_kernels + s) / max(out_pixels, 1),
        "bmm": 1.0 + (num_kernels + s) / max(out_pixels, 1),
        "output": float(num_kernels + s),
    }


__all__ = [
    "BACKENDS",
    "CONCRETE_BACKENDS",
    "TILE_BUDGET",
    "aggregate_kernels",
    "autotune_cache",
    "autotune_enabled",
    "channel_split_conv2d",
    "clear_autotune_cache",
    "col2im",
    "dynamic_conv2d",
    "export_mode",
    "flops_ratio",
    "im2col",
    "is_exporting",
    "mix_bias",
    "release_workspace",
    "resolve_backend",
    "select_backend",
    "set_autotune",
]

