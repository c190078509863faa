"""Convolution of a channel-structured PAD layer: whole output channels are static or dynamic.

A plain conv runs on the static output channels and a dynamic conv on the
dynamic ones only; the outputs are interleaved back into channel order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.nn.modules.utils import _pair

from . import autotune
from .backend_selection import resolve_backend
from .dynamic_conv import add_channel_bias, dynamic_conv2d
from .exporting import is_exporting
from .fused import library_key

_DECISIONS: dict[tuple, tuple[int, bool]] = {}  # signature -> (autotune generation, dense?)


def channel_split_runs_dense(x: Tensor, pi: Tensor, dyn_rows: Tensor, stride, padding, dilation, groups: int,
                             backend: str = "auto", sta_rows: Tensor | None = None,
                             order: Tensor | None = None) -> bool:
    """Whether :func:`channel_split_conv2d` runs the whole layer as one dynamic conv instead of splitting.

    Only for ``groups == 1``, batch > 1, not exporting. The rule: where the
    dynamic part would run as a grouped conv of per-sample kernels (``backend``
    resolving to ``"weight"``). With autotuning on and ``sta_rows`` / ``order``
    given, both plans are timed once per signature instead (like the backends,
    :mod:`.autotune`), the rule's plan first.
    """
    if groups != 1 or x.shape[0] == 1 or is_exporting():
        return False
    rule = resolve_backend(x, pi, dyn_rows, None, stride, padding, dilation, 1, backend) == "weight"
    if backend != "auto" or sta_rows is None or order is None or not autotune.autotune_enabled():
        return rule
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, pi, dyn_rows, sta_rows))
    key = ("channel_split", tuple(dyn_rows.shape), tuple(sta_rows.shape), tuple(x.shape), _pair(stride),
           str(padding), _pair(dilation), str(x.dtype), str(x.device), torch.get_num_threads(), grad,
           torch.is_grad_enabled(), *library_key())  # (the plans' speed depends on the kernel library's build)
    hit = _DECISIONS.get(key)
    if hit is not None and hit[0] == autotune.generation():
        return hit[1]
    candidates = ["dense", "split"] if rule else ["split", "dense"]
    choice = autotune.choose(key, candidates, lambda: _plan_runner(x, pi, dyn_rows, sta_rows, order, stride,
                                                                   padding, dilation, grad), x.device)
    if len(_DECISIONS) > 4096:
        _DECISIONS.clear()
    _DECISIONS[key] = (autotune.generation(), choice == "dense")
    return choice == "dense"


STATIC_ROW_MULTIPLE = 32  # oneDNN's fast conv kernels want output channels in whole blocks of this many
STATIC_ROW_MAX_PADDING = 0.125  # ... and padding is only worth this fraction of extra (zero) rows


def aligned_static_rows(sta_rows: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """``(sta_rows, order)`` with the static rows padded by zero rows to a multiple of 32, for inference.

    The plain conv of the static part is the largest cost of a channel split,
    and PyTorch's CPU conv (oneDNN) is much slower when its output channels are
    not whole blocks: at 512@4, batch 32, 358 output channels cost about 1.0x the
    conv with all 512, 352 or 384 channels 0.70-0.76x (docs/benchmarks.md,
    ``benchmarks/bench_fused_tiles.py``).
    Padding costs the extra rows' FLOPs, so it is done only when they are at most
    1/8 of the static rows (358 -> 384, not 45 -> 64); ``order`` (output channel
    -> column of ``cat([static_out, dynamic_out])``) skips the padded columns.
    Returns the inputs unchanged where no padding applies.
    """
    n_sta = sta_rows.shape[0]
    extra = -n_sta % STATIC_ROW_MULTIPLE
    if extra == 0 or extra > STATIC_ROW_MAX_PADDING * n_sta:
        return sta_rows, order
    padded = torch.cat([sta_rows, sta_rows.new_zeros((extra, *sta_rows.shape[1:]))])
    return padded, torch.where(order >= n_sta, order + extra, order)


def _dense_factors(dyn_rows: Tensor, sta_rows: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """The split rows placed back into dense ``(dyn [K, O, ...], sta [O, ...])`` (zeros elsewhere)."""
    n_sta, n_dyn = sta_rows.shape[0], dyn_rows.shape[1]
    dyn = torch.cat([dyn_rows.new_zeros((dyn_rows.shape[0], n_sta, *dyn_rows.shape[2:])), dyn_rows],
                    dim=1).index_select(1, order)
    sta = torch.cat([sta_rows, sta_rows.new_zeros((n_dyn, *sta_rows.shape[1:]))]).index_select(0, order)
    return dyn, sta


def merge_split_outputs(ys: Tensor, yd: Tensor, order: Tensor) -> Tensor:
    """The outputs of the static and dynamic channels interleaved into channel order.

    Args:
        ys: ``[B, Os', H, W]`` static outputs; its first ``O - Od`` columns are
            the static channels (more columns: zero rows padded by
            :func:`aligned_static_rows`, which ``order`` skips).
        yd: ``[B, Od, H, W]`` dynamic outputs.
        order: long ``[O]``; output channel ``o`` is column ``order[o]`` of
            ``cat([ys, yd], dim=1)``.
    Returns:
        ``[B, O, H, W]`` in the parts' promoted dtype; channels_last where both
        parts are channels_last and not also NCHW-contiguous (as the convs
        return them for a channels_last input), else NCHW.

    One pass over the output where it can be: for NCHW parts each part is
    copied once into its channels of a fresh output (``index_copy_``; ``cat``
    followed by ``index_select`` writes the output twice); for channels_last
    parts the channel gather runs along the contiguous last dimension of the
    ``[B*H*W, C]`` view, with no conversion back to channels_last after it.
    Measured (docs/benchmarks.md, ``zen3_channel_split``): NCHW 0.26x the
    two-pass time at 64@32, a tie at 128@16, 1.4-2.2x of a tiny time (under
    0.02x of the conv) at 256@8 / 512@4; channels_last 0.13-0.6x.
    Exporting keeps the plain ``cat`` + ``index_select``.
    """
    channels_last = (ys.dim() == 4 and not ys.is_contiguous() and not yd.is_contiguous()
                     and ys.is_contiguous(memory_format=torch.channels_last)
                     and yd.is_contiguous(memory_format=torch.channels_last))
    if is_exporting():
        y = torch.cat([ys, yd], dim=1).index_select(1, order)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y
    if channels_last:
        both = torch.cat([ys, yd], dim=1)  # channels_last, so [B, H, W, C] in memory
        batch, _, height, width = both.shape
        rows = both.permute(0, 2, 3, 1).reshape(-1, both.shape[1]).index_select(1, order)
        return rows.view(batch, height, width, order.shape[0]).permute(0, 3, 1, 2)
    return _interleave(ys, yd, order, 1)


def _interleave(first: Tensor, second: Tensor, order: Tensor, dim: int) -> Tensor:
    """``cat([first, second], dim).index_select(dim, order)`` written in one pass: each part copied once
    into its slices of a fresh tensor (``first``'s slices beyond ``len(order) - second.shape[dim]`` are
    padding that ``order`` skips)."""
    n_first = order.shape[0] - second.shape[dim]
    positions = torch.argsort(order)  # column -> position, the first part's columns first
    shape = list(second.shape)
    shape[dim] = order.shape[0]
    # the parts' dtypes differ under autocast (a bf16 conv beside a float32 one): promote, as cat does
    dtype = torch.promote_types(first.dtype, second.dtype)
    out = second.new_empty(shape, dtype=dtype)
    first = first if first.shape[dim] == n_first else first.narrow(dim, 0, n_first)
    out.index_copy_(dim, positions[:n_first], first.to(dtype))
    out.index_copy_(dim, positions[n_first:], second.to(dtype))
    return out


def _split(x, pi, dyn_rows, sta_rows, order, stride, padding, dilation, backend) -> Tensor:
    ys = F.conv2d(x, sta_rows, None, stride, padding, dilation)
    yd = dynamic_conv2d(x, pi, dyn_rows, None, stride=stride, padding=padding, dilation=dilation, backend=backend)
    return merge_split_outputs(ys, yd, order)


def _plan_runner(x, pi, dyn_rows, sta_rows, order, stride, padding, dilation, grad: bool):
    """``run("dense" | "split")`` on detached copies (forward, and backward with ``grad``)."""
    def copy(t):
        return t.detach().requires_grad_(grad and t.requires_grad)

    xs, pis, dyns, stas = copy(x), copy(pi), copy(dyn_rows), copy(sta_rows)
    dense = None if grad else _dense_factors(dyns, stas, order)  # inference plans reuse cached dense factors
    # the dense plan's backend is chosen (and, if need be, tuned) now, so the plan's timed runs below
    # find it decided instead of timing a nested tuning
    with torch.set_grad_enabled(grad):
        dyn0, sta0 = dense if dense is not None else _dense_factors(dyns, stas, order)
        resolve_backend(xs, pis, dyn0, sta0, stride, padding, dilation, 1, "auto")

    def run(name: str) -> None:
        with torch.set_grad_enabled(grad):
            if name == "dense":
                dyn, sta = dense if dense is not None else _dense_factors(dyns, stas, order)
                y = dynamic_conv2d(xs, pis, dyn, sta, None, None, stride, padding, dilation, 1, "auto")
            else:
                y = _split(xs, pis, dyns, stas, order, stride, padding, dilation, "auto")
            if grad:
                leaves = [t for t in (xs, pis, dyns, stas) if t.requires_grad]
                torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run


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
) -> Tensor:
    """Convolution whose output channels are either fully static or fully dynamic.

    Args:
        x: ``[B, C, H, W]``; pi: ``[B, K]`` routing weights.
        dyn_rows: ``[K, Od, C/groups, kh, kw]`` kernels of the dynamic channels (scales folded).
        sta_rows: ``[Os, C/groups, kh, kw]`` plain conv weight of the static channels.
        order: long ``[O]``; output channel ``o`` is column ``order[o]`` of
            ``cat([static_out, dynamic_out], dim=1)``.
        bias: ``[O]`` static bias, ``[B, O]`` per-sample bias, or ``None``.
        groups: 1, or depthwise (``groups == C == O``); then
            ``static_in_index`` / ``dynamic_in_index`` select the input channel
            of each static / dynamic output channel.
    Returns:
        ``[B, O, H', W']``.

    Where the dynamic part would run as a grouped conv of per-sample kernels
    (:func:`channel_split_runs_dense`), the split is not worth it: the grouped
    conv of the *whole* layer costs about a static conv there, less than a
    static conv on 70 % of the channels plus a dynamic one on 30 %
    (docs/benchmarks.md). Then the static rows are placed into dense factors
    and the whole layer runs as one dynamic conv (its backend chosen like any
    dynamic conv's: ``backend``, autotuned for ``"auto"``).
    """
    if groups == 1 and x.shape[0] == 1 and not is_exporting():
        # one sample: assemble its whole kernel (static rows + mixed dynamic rows) and run one conv
        mixed = (pi @ dyn_rows.flatten(1)).view(dyn_rows.shape[1:])
        weight = _interleave(sta_rows, mixed, order, 0)  # one pass over the kernel
        return add_channel_bias(F.conv2d(x, weight, None, stride, padding, dilation), bias)
    if groups == 1:
        if channel_split_runs_dense(x, pi, dyn_rows, stride, padding, dilation, groups, backend, sta_rows, order):
            dyn, sta = _dense_factors(dyn_rows, sta_rows, order)
            y = dynamic_conv2d(x, pi, dyn, sta, None, None, stride, padding, dilation, 1, backend)
            return add_channel_bias(y, bias)
        y = _split(x, pi, dyn_rows, sta_rows, order, stride, padding, dilation, backend)
    else:
        xs = x.index_select(1, static_in_index)
        xd = x.index_select(1, dynamic_in_index)
        ys = F.conv2d(xs, sta_rows, None, stride, padding, dilation, sta_rows.shape[0])
        yd = dynamic_conv2d(xd, pi, dyn_rows, None, stride=stride, padding=padding, dilation=dilation,
                            groups=dyn_rows.shape[1], backend=backend)
        y = merge_split_outputs(ys, yd, order)
    y = add_channel_bias(y, bias)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


__all__ = ["STATIC_ROW_MAX_PADDING", "STATIC_ROW_MULTIPLE", "aligned_static_rows", "channel_split_conv2d",
           "channel_split_runs_dense", "merge_split_outputs"]
