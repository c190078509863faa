"""Which backend runs a dynamic conv: explicit name, autotuned choice, or the cost rule.

:func:`resolve_backend` decides per call signature and remembers the decision,
so repeated calls with the same shapes cost one dictionary lookup.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import autotune
from .conv_backends import CONCRETE_BACKENDS, run_backend
from .exporting import is_exporting
from .fused import fused_applicable, fused_enabled, fused_mode, library_key, packed_routed_tail, routed_call
from .geometry import ConvGeometry

BACKENDS = ("auto", *CONCRETE_BACKENDS)

# Cost-rule constants (CPU), measured on one machine (docs/benchmarks.md); the rule is the fallback when
# autotuning is off and the choice while exporting.
_GROUPED_MIN_L = 256  # output pixels per sample from which the grouped conv beats bmm
_OUTPUT_MAX_L = 16  # per-sample GEMM width at or below which streaming B kernels is the cost: the fused kernel


def select_backend(
    backend: str,
    batch_size: int,
    out_channels: int,
    groups: int,
    *,
    out_pixels: int,
    device: torch.device | str | None = None,
    exporting: bool = False,
    requires_grad: bool = False,
    fused_available: bool = False,
) -> str:
    """Resolve ``"auto"`` by the cost rule (explicit names pass through).

    Let ``L`` be the output pixels per sample (``out_pixels``) and ``P`` the
    size of one kernel. Weight space costs one conv worth of FLOPs but streams
    ``B * P`` per-sample kernel values through a GEMM only ``L`` columns wide;
    output space costs ``K (+1)`` convs of FLOPs as one large, cache-friendly conv.

    - Batch 1 or depthwise (``groups == out_channels``): ``"weight"``.
    - ``L <= _OUTPUT_MAX_L`` (16), ``groups == 1``: ``"fused"`` for inference
      where the compiled kernel is available (``fused_available``), else
      ``"bmm"``; grouped: ``"output"``. (At 512@4, batch 32 the fused kernel
      measured 0.55x / 0.43x the time of ``"output"`` and ``"bmm"`` 0.95x /
      0.55x on an Intel Xeon / an AMD Zen 3, batch 8 alike: docs/benchmarks.md,
      section on ``auto``.)
    - ``L >= _GROUPED_MIN_L`` (256) or grouped convs: ``"weight"``.
    - Otherwise ``"bmm"``; non-CPU devices ``"weight"``.
    - Exporting: never ``"weight"`` (``groups = B`` would freeze the batch size):
      ``"output"`` for depthwise / thin layers, else ``"bmm"`` (untiled).
    """
    if backend != "auto":
        return backend
    depthwise = groups > 1 and groups == out_channels
    if exporting:
        return "output" if depthwise or out_pixels <= _OUTPUT_MAX_L else "bmm"
    if batch_size == 1 or depthwise:
        return "weight"
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return "weight"
    if out_pixels <= _OUTPUT_MAX_L:
        if groups > 1:
            return "output"
        return "fused" if fused_available and not requires_grad else "bmm"
    if out_pixels >= _GROUPED_MIN_L or groups > 1:
        return "weight"
    return "bmm"


@lru_cache(maxsize=512)
def _geometry(kernel: tuple, stride, padding, dilation, groups: int) -> ConvGeometry:
    return ConvGeometry(kernel, stride, padding, dilation, groups)


def conv_geometry(kernel, stride, padding, dilation, groups: int) -> ConvGeometry:
    """A (memoised) :class:`ConvGeometry`; list-valued arguments are accepted too."""
    if torch.compiler.is_compiling():  # dynamo traces the constructor; the memo would only add a warning
        return ConvGeometry(kernel, stride, padding, dilation, groups)
    try:
        return _geometry(tuple(kernel), stride, padding, dilation, int(groups))
    except TypeError:  # unhashable (lists)
        return ConvGeometry(kernel, stride, padding, dilation, groups)


_CHOICES: dict[tuple, tuple[tuple[bool, int], str]] = {}  # signature -> ((tuning, generation), backend)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, stride, padding, dilation,
                    groups: int, backend: str = "auto", geom: ConvGeometry | None = None) -> str:
    """Concrete backend for this call.

    Explicit names are honoured (except ``"weight"`` while exporting); ``"auto"``
    is the autotuned choice (batch > 1, tuning on, not exporting) or the cost rule.
    Raises a clear error for an unknown backend or an input smaller than the kernel.
    """
    exporting = is_exporting()
    if backend != "auto":
        if backend not in CONCRETE_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if not (exporting and backend == "weight"):  # groups = B cannot be exported with a dynamic batch axis
            return backend
    if geom is None:
        geom = conv_geometry(dyn.shape[-2:], stride, padding, dilation, groups)
    grad = _needs_grad(x, pi, dyn, sta)
    if exporting:  # deterministic: the rule, never timing, never the process's cache
        ho, wo = geom.out_hw(x.shape[-2:])
        return select_backend("auto", 2, dyn.shape[1], groups, out_pixels=ho * wo, exporting=True)
    key = (tuple(dyn.shape), sta is not None, tuple(x.shape), geom.stride, str(padding), geom.dilation, geom.groups,
           str(x.dtype), str(x.device), torch.get_num_threads(), fused_enabled(), grad, torch.is_grad_enabled())
    # (the library loading later bumps the generation: the rule's choice depends on it)
    tuning = autotune.autotune_enabled()
    hit = _CHOICES.get(key)
    if hit is not None and hit[0] == (tuning, autotune.generation()):
        return hit[1]
    ho, wo = geom.out_hw(x.shape[-2:])  # raises the clear "input smaller than the kernel" error
    fused_mode()  # a bad PADNET_FUSED raises on the first batched call, not only in a later no-grad one
    fused_ok = x.shape[0] > 1 and fused_applicable(x, pi, dyn, sta, groups, grad)
    rule = select_backend("auto", int(x.shape[0]), dyn.shape[1], groups, out_pixels=ho * wo, device=x.device,
                          requires_grad=grad, fused_available=fused_ok)
    if x.shape[0] > 1 and tuning:
        candidates = [rule] + [b for b in CONCRETE_BACKENDS if b != rule]
        if groups > 1 and groups == dyn.shape[1]:  # depthwise: width-1 GEMMs are never competitive
            candidates = [b for b in candidates if b != "bmm"] or ["weight"]
        if fused_ok and rule != "fused":
            # right after the rule's choice: the budget may run out before the last candidates' warm-ups, and
            # the fused kernel is built for the deep layers where the rule's choice is weakest
            candidates.insert(1, "fused")
        choice = _tuned(candidates, key, lambda: _trial_runner(x, pi, dyn, sta, geom, padding, grad), x.device)
    else:
        choice = rule
    return _remember(key, tuning, choice)


def resolve_single_sample_backend(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, stride, padding, dilation,
                                  groups: int, geom: ConvGeometry | None = None, bias: bool = False,
                                  compiled: bool = False) -> str:
    """Backend of a batch-1 inference call (:func:`.dynamic_conv.single_sample_conv`).

    ``"weight"`` aggregates the sample's one kernel and runs one plain conv: the
    rule, and the choice while exporting or with tuning off. With tuning on and the
    C++ library available, ``"weight"``, ``"fused"`` and ``"bmm"`` are timed once
    per signature and the fastest is used. The fused kernel streams the K kernels
    once and never writes the aggregated one; ``"bmm"`` at batch 1 mixes the whole
    kernel into a reused workspace (compiled when there is no static part and
    K <= 64) and runs im2col plus one BLAS GEMM. Which wins depends on the CPU
    (``bmm`` on an AMD Zen 3 from 128@16 up, the fused kernel at 512@4 on an
    Intel Xeon; docs/benchmarks.md).

    Each candidate is timed as the caller will run it: with ``compiled`` (a
    layer whose batch-1 call runs compiled) through the compiled one-call
    forward (:func:`.fused.routed_call`, with a small stand-in router of the
    default form) where the candidate has one, else through
    :func:`.dynamic_conv.single_sample_conv` (the functional API); with a bias
    when ``bias`` and in ``x``'s memory format. All three are part of the
    signature.
    """
    if is_exporting() or not autotune.autotune_enabled():
        return "weight"
    if geom is None:
        geom = conv_geometry(dyn.shape[-2:], stride, padding, dilation, groups)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    key = ("single_sample", tuple(dyn.shape), sta is not None, tuple(x.shape), geom.stride, str(padding),
           geom.dilation, geom.groups, str(x.dtype), str(x.device), torch.get_num_threads(), fused_enabled(),
           channels_last, bool(bias), bool(compiled))
    hit = _CHOICES.get(key)
    if hit is not None and hit[0] == (True, autotune.generation()):
        return hit[1]
    choice = "weight"
    if fused_applicable(x, pi, dyn, sta, groups, False):
        choice = _tuned(["weight", "fused", "bmm"], key,
                        lambda: _single_sample_runner(x, pi, dyn, sta, geom, padding, bias, compiled), x.device)
    return _remember(key, True, choice)


def _single_sample_runner(x, pi, dyn, sta, geom, padding, bias: bool, compiled: bool):
    """``run(name)``: one batch-1 inference call by ``"weight"`` (aggregate + plain conv), ``"fused"`` or
    ``"bmm"``, compiled or through the Python path (see :func:`resolve_single_sample_backend`)."""
    from .dynamic_conv import single_sample_conv  # (dynamic_conv imports this module)

    k = dyn.shape[0]
    bias_sta = x.new_zeros(dyn.shape[1]) if bias else None
    # a stand-in router of the default form (pool -> Linear -> ReLU -> Linear -> softmax; one hidden unit, no
    # norm): the same routing ops for every candidate, about a layer's
    router = (x.new_zeros(1, x.shape[1]), None, None, None, None, None, 0.0, x.new_zeros(k, 1), None, 1.0, False)
    pad = padding if isinstance(padding, str) else tuple(_pair(padding))  # (the layers keep a tuple)
    # looked up once, as a layer keeps its decision's compiled call
    calls = {name: routed_call(x, dyn, geom, name, pad) if compiled else None for name in ("weight", "fused", "bmm")}
    if calls["fused"] is not None:  # the factors packed for the kernel's tiles, as a layer keeps them
        function, tail = calls["fused"]
        calls["fused"] = function, packed_routed_tail(dyn, tail)

    def run(name: str) -> None:
        with torch.no_grad():
            routed = calls.get(name)
            if routed is not None:
                function, tail = routed
                function(x, *router, dyn, sta, None, bias_sta, *tail)
            else:
                single_sample_conv(x, pi, dyn, sta, None, bias_sta, geom.stride, padding, geom.dilation,
                                   geom.groups, name)

    return run


def _tuned(candidates: list[str], key: tuple, make_run, device) -> str:
    """The autotuned choice among ``candidates`` for the call signature ``key`` (:func:`.autotune.choose`:
    cached, a stored one confirmed once per process, else timed; ``make_run()`` gives the trial runner).

    The candidate set is part of the tuning key (a backend that becomes available later, the fused kernel
    once built, is timed then instead of losing to a winner tuned without it), and so is the compiled
    library's build while it is in use (:func:`.fused.library_key`: a rebuilt library is timed again).
    """
    return autotune.choose((tuple(candidates), *key, *library_key()), candidates, make_run, device)


def _remember(key: tuple, tuning: bool, choice: str) -> str:
    """Keep ``choice`` for ``key`` in this process until the tuning state or generation changes."""
    if len(_CHOICES) > 4096:
        _CHOICES.clear()
    _CHOICES[key] = ((tuning, autotune.generation()), choice)
    return choice


def _trial_runner(x, pi, dyn, sta, geom, padding, grad: bool):
    """``run(name)``: one forward (and backward with ``grad``) on detached copies of the real inputs."""
    def copy(t):
        return None if t is None else t.detach().requires_grad_(grad and t.requires_grad)

    xs, pis, dyns, stas = copy(x), copy(pi), copy(dyn), copy(sta)

    def run(name: str) -> None:
        with torch.set_grad_enabled(grad):
            y = run_backend(name, xs, pis, dyns, stas, geom, padding)
            if grad:
                leaves = [t for t in (xs, pis, dyns, stas) if t is not None and t.requires_grad]
                torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run


def clear_choices() -> None:
    """Forget the per-signature decisions of this process (the autotune cache is separate)."""
    _CHOICES.clear()


__all__ = ["BACKENDS", "clear_choices", "conv_geometry", "resolve_backend", "resolve_single_sample_backend",
           "select_backend"]
