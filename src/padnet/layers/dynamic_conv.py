"""Partially dynamic 2-D convolution (DY-Conv / CondConv with PAD modes)."""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..ops import autotune
from ..ops.backend_selection import BACKENDS, conv_geometry, resolve_single_sample_backend
from ..ops.channel_split import aligned_static_rows, channel_split_conv2d, channel_split_runs_dense
from ..ops.dynamic_conv import dynamic_conv2d, mix_bias, single_sample_conv
from ..ops.exporting import is_exporting
from ..ops.fused import fused_enabled, packed_routed_tail, routed_call
from ..ops.geometry import ConvGeometry, check_conv_hyperparameters
from ..ops.masked_conv import masked_dynamic_conv2d
from .modes import (
    CompactLayerMixin, PackedModeGroup, PadLayerMixin, ScaleFactors, combine_factors, register_mask,
    register_routing_stats,
)
from .modes import cached_derived as _cached
from .modes import tensor_key as _tensor_key

ROUTINGS = ("softmax", "sigmoid")
ROUTER_INITS = ("official", "torch")
ROUTER_NORMS = ("none", "batch")
# torch's registries of hooks on every module (read as dicts: non-empty means a hook runs)
_GLOBAL_FORWARD_HOOKS = nn.modules.module._global_forward_hooks
_GLOBAL_FORWARD_PRE_HOOKS = nn.modules.module._global_forward_pre_hooks
_PLAIN_TENSORS = (Tensor, nn.Parameter)


def _runs_plain(module: nn.Module) -> bool:
    """Whether calling ``module`` runs just its class's ``forward``: no forward (pre-)hooks of its own and no
    ``forward`` replaced on the instance (as offloading / hooking libraries do)."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _torch_function_mode_active() -> bool:
    """Whether a ``TorchFunctionMode`` is active (it sees Python-level torch calls, not those made in C++)."""
    return torch._C._len_torch_function_stack() > 0


class RouterBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the router's hidden units ``[B, hidden]`` (as in ODConv's attention branch).

    Global average pooling over many positions makes the pooled vector of an
    early layer nearly the same for every input; normalising the hidden units
    over the batch removes that common part, so the logits vary with the input.
    A training batch of one sample (where batch statistics are undefined) is
    normalised with the running statistics, which it does not update.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        return super().forward(x)


class KernelAttention(nn.Module):
    """Routing network: global average pool -> Linear [-> BatchNorm] -> ReLU -> Linear (K logits).

    ``forward(x [B, C, H, W]) -> logits [B, K]``. ``norm="batch"`` inserts a
    :class:`RouterBatchNorm` after the hidden layer; ``"none"`` (default) is
    the official PAD-Net / DY-Conv router.
    """

    def __init__(self, in_channels: int, num_kernels: int, reduction: int, device=None, dtype=None,
                 init: str = "official", norm: str = "none") -> None:
        super().__init__()
        if norm not in ROUTER_NORMS:
            raise ValueError(f"unknown router_norm {norm!r}; expected one of {ROUTER_NORMS}")
        hidden = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.norm = RouterBatchNorm(hidden, device=device, dtype=dtype) if norm == "batch" else None
        self.fc2 = nn.Linear(hidden, num_kernels, device=device, dtype=dtype)
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "official") -> None:
        """``"official"`` (PAD-Net / DY-Conv reference code): ``fc1.weight ~ N(0, 2 / hidden)``
        (He-normal, fan-out), ``fc2.weight ~ N(0, 2 / K)``, zero biases -- logits of order
        one, so routing depends on the input from the start. ``"torch"``: ``nn.Linear``'s
        default (tiny logits, near-uniform routing for every input)."""
        if init not in ROUTER_INITS:
            raise ValueError(f"unknown router_init {init!r}; expected one of {ROUTER_INITS}")
        if self.norm is not None:
            self.norm.reset_parameters()
        if init == "torch":
            self.fc1.reset_parameters()
            self.fc2.reset_parameters()
            return
        nn.init.normal_(self.fc1.weight, 0.0, math.sqrt(2.0 / self.fc1.out_features))
        nn.init.normal_(self.fc2.weight, 0.0, math.sqrt(2.0 / self.fc2.out_features))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def routing_tensors(self) -> tuple | None:
        """``(fc1.weight, fc1.bias, norm weight, norm bias, running mean, running var, eps, fc2.weight,
        fc2.bias)`` (``None`` for absent parts; no norm: ``eps`` 0), for a compiled call that computes this
        router (:func:`padnet.ops.fused.routed_call`) -- or ``None`` when :meth:`forward` may do anything
        else: a subclass, replaced or subclassed parts, a norm without running statistics, any forward
        hook (the layer then calls the module). Runs on every batch-1 inference call: dictionary reads only.
        """
        if type(self) is not KernelAttention or _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS \
                or not _runs_plain(self):
            return None
        modules = self._modules
        fc1, fc2, norm = modules["fc1"], modules["fc2"], modules.get("norm")  # (a None norm is a plain attribute)
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or not _runs_plain(fc1) or not _runs_plain(fc2):
            return None
        p1, p2 = fc1._parameters, fc2._parameters
        if norm is None:
            parts = p1["weight"], p1["bias"], None, None, None, None, 0.0, p2["weight"], p2["bias"]
        else:
            buffers = norm._buffers
            mean, var = buffers.get("running_mean"), buffers.get("running_var")
            if type(norm) is not RouterBatchNorm or mean is None or var is None or not _runs_plain(norm):
                return None
            pn = norm._parameters
            parts = p1["weight"], p1["bias"], pn.get("weight"), pn.get("bias"), mean, var, norm.eps, p2["weight"], \
                p2["bias"]
        # plain tensors only: a tensor subclass (quantized or offloaded weights) runs its own Python code
        return parts if all(type(t) in _PLAIN_TENSORS for t in parts if t is not None and type(t) is not float) else None

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x.mean(dim=(2, 3)))
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.fc2(F.relu(hidden))


def routing_from_logits(logits: Tensor, routing: str, temperature: float) -> Tensor:
    """Routing weights ``[B, K]`` from logits: softmax(z / T) or sigmoid(z / T)."""
    z = logits if temperature == 1.0 else logits / temperature
    if routing == "softmax":
        if z.dtype in (torch.float16, torch.bfloat16):  # normalise in float32
            return torch.softmax(z.float(), dim=-1).to(logits.dtype)
        return torch.softmax(z, dim=-1)
    return torch.sigmoid(z)


def _check_conv_args(in_channels: int, out_channels: int, groups: int, num_kernels: int, reduction: int) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                        ("num_kernels", num_kernels), ("reduction", reduction)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )
    if num_kernels < 1:
        raise ValueError(f"num_kernels (K) must be >= 1, got {num_kernels}")
    if reduction < 1:
        raise ValueError(f"reduction must be >= 1, got {reduction}")


class _ConvGeometry:
    """Shared conv hyper-parameters and input checks of the PAD conv and its deploy form."""

    in_channels: int
    groups: int
    # per-process caches left out when pickling (:class:`~padnet.layers.modes.PerProcessCaches`): the
    # inference plan's entries and the batch-1 decision (which may hold a compiled function)
    _per_process_attrs = ("_inference_cache", "_single_sample_choice")

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, routing,
                      temperature, backend) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        check_conv_hyperparameters(kernel_size, stride, padding, dilation)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.routing = routing
        self.backend = backend
        self.temperature = temperature
        geom = ConvGeometry(self.kernel_size, self.stride, self.padding, self.dilation, groups)
        # smallest input (H, W) with at least one output pixel: decided once, checked per call
        self._min_input_hw = tuple(d * (k - 1) + 1 - p0 - p1 for k, d, p0, p1 in zip(
            geom.kernel, geom.dilation, geom.pad[::2], geom.pad[1::2]))

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self._temperature = float(value)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects input [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        min_h, min_w = self._min_input_hw
        if x.shape[2] < min_h or x.shape[3] < min_w:
            raise ValueError(
                f"{type(self).__name__}: input of spatial size {x.shape[2]}x{x.shape[3]} is smaller than the kernel "
                f"(kernel_size={self.kernel_size}, dilation={self.dilation}, padding={self.padding} need at least "
                f"{min_h}x{min_w})"
            )

    def _check_input_once(self, x: Tensor) -> None:
        """:meth:`_check_input`, skipped when ``x`` has the shape last checked (the batch-1 deploy paths)."""
        if self.__dict__.get("_checked_input_shape") != x.shape:
            self._check_input(x)
            self.__dict__["_checked_input_shape"] = x.shape

    def _single_sample_decision(self, x: Tensor, dyn: Tensor, sta: Tensor | None, bias: bool,
                                compiled: bool = True) -> tuple:
        """``(backend, routed)`` for a batch-1 inference call on ``x [1, C, H, W]``, decided once per input
        shape, memory format, dtype, device, thread count, autotune state, ``PADNET_FUSED``, geometry,
        routing, whether there is a bias and whether the call may be compiled, and kept on the layer (a
        tuple comparison per call).

        ``backend``: ``"weight"``, ``"fused"`` or ``"bmm"``
        (:func:`~padnet.ops.backend_selection.resolve_single_sample_backend`, its candidates timed the way
        this layer will run them). ``routed``: the compiled one-call forward of that backend,
        ``(function, tail arguments)`` (:func:`~padnet.ops.fused.routed_call`), where ``compiled``, it can
        run and the layer routes the default way, else ``None``."""
        state = (x.shape, x.is_contiguous(), x.dtype, x.device, torch.get_num_threads(), autotune.autotune_enabled(),
                 autotune.generation(), fused_enabled(), self.padding, self.stride, self.dilation, self.routing, bias,
                 compiled)
        hit = self.__dict__.get("_single_sample_choice")
        if hit is not None and hit[0] == state:
            return hit[1]
        cls = type(self)
        # (a subclass that routes its own way, or a router other than a plain KernelAttention, keeps the
        # Python path; per-call conditions -- hooks, tensor subclasses, torch-function modes -- are checked by
        # the call, which then runs the Python path with the decision made for the compiled one)
        compiled = compiled and self.routing in ROUTINGS and all(type(v) is tuple for v in (self.stride,
                                                                                             self.dilation)) \
            and cls._route is _ConvGeometry._route and cls.temperature is _ConvGeometry.temperature \
            and type(self._modules.get("attention")) is KernelAttention
        pi = x.new_full((1, dyn.shape[0]), 1.0 / dyn.shape[0])  # timings do not depend on the routing values
        choice = resolve_single_sample_backend(x, pi, dyn, sta, self.stride, self.padding, self.dilation,
                                               self.groups, bias=bias, compiled=compiled)
        routed = None
        if compiled:
            geom = conv_geometry(dyn.shape[-2:], self.stride, self.padding, self.dilation, self.groups)
            routed = routed_call(x, dyn, geom, choice, self.padding)
        self.__dict__["_single_sample_choice"] = (state, (choice, routed))
        return choice, routed

    def _single_sample_backend(self, x: Tensor, dyn: Tensor, sta: Tensor | None, bias: bool) -> str:
        """The backend of :meth:`_single_sample_decision` for a call that runs the Python path."""
        return self._single_sample_decision(x, dyn, sta, bias, compiled=False)[0]

    def _single_sample_call(self, x: Tensor, dyn: Tensor, sta: Tensor | None, bias_dyn: Tensor | None,
                            bias_sta: Tensor | None) -> Tensor:
        """Batch-1 inference on checked ``x [1, C, H, W]`` with the plan's factors -> ``[1, O, H', W']``.

        One compiled call (routing, mixing, conv) when the decision allows it and the router is the
        plain default (:meth:`KernelAttention.routing_tensors`); otherwise routing in Python and
        :func:`~padnet.ops.dynamic_conv.single_sample_conv`. Same result either way.
        """
        backend, routed = self._single_sample_decision(x, dyn, sta, bias_dyn is not None or bias_sta is not None)
        if routed is not None and type(x) is Tensor and not _torch_function_mode_active():
            attention = self._modules.get("attention")
            router = attention.routing_tensors() if type(attention) is KernelAttention else None
            if router is not None:
                function, tail = routed
                if backend == "fused":
                    tail = self._packed_fused_tail(dyn, tail)
                return function(x, *router, self._temperature, self.routing != "softmax", dyn, sta, bias_dyn,
                                bias_sta, *tail)
        return single_sample_conv(x, self._route(x), dyn, sta, bias_dyn, bias_sta, self.stride, self.padding,
                                  self.dilation, self.groups, backend)

    def _packed_fused_tail(self, dyn: Tensor, tail: tuple) -> tuple:
        """The fused call's ``tail`` with ``dyn`` packed for its tiles (:func:`~padnet.ops.fused.packed_routed_tail`),
        kept in the inference cache until the tensors ``dyn`` derives from (:meth:`_factor_tensors`) change or the
        decision's tiles do: a copy as large as ``dyn`` while the layer serves batch-1 inference, freed with the
        rest of the cache by an autograd forward; none with ``cache_weights`` off."""
        if not self.__dict__.get("cache_weights", True):
            self.__dict__.get("_inference_cache", {}).pop("fused_packed", None)
            return tail  # (no inference copies wanted: the row layout)
        sources = self._factor_tensors()  # (dyn is derived from them; itself maybe an inference tensor)

        def pack() -> tuple:
            return tail, packed_routed_tail(dyn, tail)

        kept = _cached(self, "fused_packed", sources, pack)
        if kept[0] is not tail:  # another decision (thread count, input shape): its tiles
            self.__dict__["_inference_cache"].pop("fused_packed", None)
            kept = _cached(self, "fused_packed", sources, pack)
        return kept[1]

    def routing_weights(self, x: Tensor) -> Tensor:
        """Routing weights ``[B, K]`` for input ``x [B, C, H, W]``, temperature applied."""
        self._check_input(x)
        return self._route(x)

    def _route(self, x: Tensor) -> Tensor:
        """:meth:`routing_weights` without the input check (callers checked already)."""
        return routing_from_logits(self.attention(x), self.routing, self.temperature)

    def _conv(self, x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor, bias_dyn, bias_sta) -> Tensor:
        return dynamic_conv2d(
            x, pi, dyn, sta, bias_dyn, bias_sta, self.stride, self.padding, self.dilation, self.groups, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"routing={self.routing!r}, temperature={self.temperature:g}, backend={self.backend!r}"
        )


class DynamicConv2d(_ConvGeometry, PadLayerMixin, nn.Module):
    """Dynamic convolution with K kernels, a static copy and a PAD mode mask.

    ``W_hat(x) = lambda_d * M * sum_k pi_k(x) W_k + lambda_s * (1 - M) * W_s``;
    with ``bias=True`` the bias is mixed the same way under its own mask.

    Shapes: input ``[B, C, H, W]``, output ``[B, O, H', W']``;
    ``weight_dynamic [K, O, C/groups, kh, kw]``, ``weight_static`` and
    ``mode_mask`` ``[O, C/groups, kh, kw]``; with bias ``bias_dynamic [K, O]``,
    ``bias_static`` and ``bias_mode_mask`` ``[O]``.
    """

    _mode_group_specs = (
        ("weight", "weight_dynamic", "weight_static", "mode_mask", 0, 2),
        ("bias", "bias_dynamic", "bias_static", "bias_mode_mask", 0, 1),
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 1.0,
        routing: str = "softmax",
        scale: str = "learned",
        backend: str = "auto",
        device=None,
        dtype=None,
        router_init: str = "official",
        router_norm: str = "none",
    ) -> None:
        super().__init__()
        _check_conv_args(in_channels, out_channels, groups, num_kernels, reduction)
        if router_init not in ROUTER_INITS:
            raise ValueError(f"unknown router_init {router_init!r}; expected one of {ROUTER_INITS}")
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, routing,
                           temperature, backend)
        self.num_kernels = num_kernels
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight_dynamic = nn.Parameter(torch.empty(num_kernels, *shape, **factory))
        self.weight_static = nn.Parameter(torch.empty(shape, **factory))
        register_mask(self, "mode_mask", shape, device=device, dtype=dtype)
        if bias:
            self.bias_dynamic = nn.Parameter(torch.empty(num_kernels, out_channels, **factory))
            self.bias_static = nn.Parameter(torch.empty(out_channels, **factory))
            register_mask(self, "bias_mode_mask", (out_channels,), device=device, dtype=dtype)
        else:
            self.register_parameter("bias_dynamic", None)
            self.register_parameter("bias_static", None)
            self.register_buffer("bias_mode_mask", None)
        self.router_init = router_init
        # (KernelAttention rejects an unknown router_norm before any of the layer's state is registered)
        self.attention = KernelAttention(in_channels, num_kernels, reduction, init=router_init, norm=router_norm,
                                         **factory)
        self.scale = ScaleFactors(scale, **factory)
        register_routing_stats(self, num_kernels, 1.0 / num_kernels if routing == "softmax" else 0.5, device=device)
        self.reset_parameters()

    @property
    def router_norm(self) -> str:
        """``"batch"`` if the router normalises its hidden units (:class:`RouterBatchNorm`), else ``"none"``."""
        return "none" if self.attention.norm is None else "batch"

    @property
    def routing_sums_to_one(self) -> bool:  # type: ignore[override]
        return self.routing == "softmax"

    def _apply(self, fn, recurse=True):
        """``Module.to(memory_format=torch.channels_last)`` converts 4-D and 5-D tensors, but
        channels_last is a 4-D format: ``weight_dynamic [K, O, C/g, kh, kw]`` is converted as
        ``[K * O, C/g, kh, kw]`` (each kernel channels_last) and viewed back."""
        def convert(t):
            try:
                return fn(t)
            except RuntimeError as exc:
                if t.dim() != 5 or "channels_last" not in str(exc):
                    raise
                return fn(t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])).view(t.shape)

        return super()._apply(convert, recurse)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The ``"fresh"`` initialisation of the official PAD-Net code.

        Every kernel ``W_k`` and the static copy ``W_s`` independently
        He-normal with fan-out, ``N(0, 2 / (O * kh * kw))``; biases zero. With
        independent kernels the mixed kernel of a (near-uniformly routed)
        dynamic conv has ``1 / sqrt(K)`` of a single kernel's norm, which keeps
        its relative update size that of a static conv when a normalisation
        layer follows (docs/core.md, "Initialisation"). The router is
        initialised by :meth:`KernelAttention.reset_parameters` (``router_init``).
        """
        for w in (*self.weight_dynamic, self.weight_static):
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        if self.bias_dynamic is not None:
            nn.init.zeros_(self.bias_dynamic)
            nn.init.zeros_(self.bias_static)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        num_kernels: int = 4,
        init: str = "inherit",
        noise_std: float = 0.01,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> "DynamicConv2d":
        """Build from a static ``nn.Conv2d``.

        ``init="inherit"`` (for a *trained* conv: the dynamic layer starts as
        the same function): ``W_s = W`` and ``W_k = W + noise_std * std(W) * N(0, 1)``
        (the noise breaks the symmetry that would zero the Taylor scores).
        ``init="fresh"`` (training from scratch): independent He-normal fan-out
        kernels as the official PAD-Net code (:meth:`reset_parameters`); the
        conv's values are not used. Bias follows the same rule. The router is
        initialised per ``router_init`` (keyword, default ``"official"``).
        """
        if init not in ("inherit", "fresh"):
            raise ValueError(f"unknown init {init!r}; expected 'inherit' or 'fresh'")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=conv.bias is not None, num_kernels=num_kernels,
            device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )
        if init == "inherit":
            with torch.no_grad():
                _inherit(layer.weight_static, layer.weight_dynamic, conv.weight, noise_std, generator)
                if conv.bias is not None:
                    _inherit(layer.bias_static, layer.bias_dynamic, conv.bias, noise_std, generator)
        return layer

    def combined_factors(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(dyn, sta, bias_dyn, bias_sta)`` with mask and scales folded in."""
        lambda_s, lambda_d = self.scales()
        dyn, sta = combine_factors(self.weight_dynamic, self.weight_static, self.mode_mask, lambda_s, lambda_d,
                                   getattr(self, "live_mask", None))
        if self.bias_dynamic is None:
            return dyn, sta, None, None
        bias_dyn, bias_sta = combine_factors(
            self.bias_dynamic, self.bias_static, self.bias_mode_mask, lambda_s, lambda_d,
            getattr(self, "bias_live_mask", None),
        )
        return dyn, sta, bias_dyn, bias_sta

    def aggregated_weight(self, x: Tensor) -> Tensor:
        """Per-sample kernels ``W_hat(x)`` ``[B, O, C/groups, kh, kw]`` (reference / analysis)."""
        pi = self.routing_weights(x)
        dyn, sta, _, _ = self.combined_factors()
        return torch.einsum("bk,k...->b...", pi, dyn) + sta

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, O, H', W']``.

        Four plans, all computing the same function with the same gradients:
        inference (no autograd, ``backend="auto"``: one cached plan,
        :meth:`_inference_forward`), the literal formula (explicit backend,
        export, a mask that itself needs a gradient, pruned entries), element
        masks in training (the mask folded into the backends' autograd), and
        the structured masks of :meth:`_structured_forward`.
        """
        if x.dim() == 4 and x.shape[0] == 1 and not torch.is_grad_enabled():  # deploy latency: the shortest path
            factors = self._single_sample_factors(x)
            if factors is not None:
                return self._single_sample_call(x, *factors)
        pi = self.routing_weights(x)
        exporting = is_exporting()
        self._observe_routing(pi, exporting)
        if not torch.is_grad_enabled() and not exporting and self.backend == "auto" \
                and self.__dict__.get("cache_weights", True) and not self._masks_require_grad():
            # (a mask that requires grad is not 0/1 -- e.g. fractional gates -- and takes the literal formula)
            return self._inference_forward(x, pi)
        self.__dict__.pop("_inference_cache", None)  # autograd (or caching off): free what inference cached
        if self.backend != "auto" or exporting or self._masks_require_grad() or self.has_pruned():
            # An explicit backend is honoured literally (FLOP counting relies on "weight"); a mask that
            # requires grad (mode partition scoring dL/dM) must stay in the graph via combine_factors; pruned
            # entries (live mask) are zeroed there too.
            return self._conv(x, pi, *self.combined_factors())
        structure = self.mask_structure()
        if structure.kind == "element":
            lambda_s, lambda_d = self.scales()  # the mask is folded into the backends' autograd
            return masked_dynamic_conv2d(x, pi, self.weight_dynamic, self.weight_static, self.mode_mask, lambda_s,
                                         lambda_d, *self._bias_factors(lambda_s, lambda_d), self.stride,
                                         self.padding, self.dilation, self.groups,
                                         routing_sums_to_one=self.routing == "softmax")
        return self._structured_forward(x, pi, structure)

    def _inference_forward(self, x: Tensor, pi: Tensor) -> Tensor:
        """Inference (no autograd, ``backend="auto"``): one cached plan, checked by one key per call.

        The plan -- mask structure and the scaled (and, for softmax, static-folded)
        factors it needs -- is rebuilt only when a factor tensor, mask or live mask
        changes (version counters), so a batch-1 call runs routing, one key
        comparison and the conv, with no per-call mask analysis.
        """
        st, factors = _cached(self, "plan", self._factor_tensors(), self._inference_plan)
        if st.kind == "channel":
            return self._channel_split(x, pi, st, *factors)
        if st.kind == "zeros":
            return self._static_conv(x, pi, *factors)
        dyn, sta, bias_dyn, bias_sta = factors  # "ones" and "element" (pruned entries included)
        if x.shape[0] == 1:  # the deploy latency case: the backend decided once per input shape
            backend = self._single_sample_backend(x, dyn, sta, bias_dyn is not None or bias_sta is not None)
            return single_sample_conv(x, pi, dyn, sta, bias_dyn, bias_sta, self.stride, self.padding,
                                      self.dilation, self.groups, backend)
        return dynamic_conv2d(x, pi, dyn, sta, bias_dyn, bias_sta, self.stride, self.padding, self.dilation,
                              self.groups, "auto")

    def _single_sample_factors(self, x: Tensor) -> tuple | None:
        """``(dyn, sta, bias_dyn, bias_sta)`` of the cached inference plan for one sample (eval, no autograd,
        ``backend="auto"``, no routing probe, not exporting, an all-dynamic or element plan), else ``None``.

        Everything else is decided once: the input is checked when its shape changes, the plan is
        rebuilt when a factor tensor does (:meth:`_inference_forward`); per call this costs a few
        attribute reads and one version-counter key. Python work per call is what separated padnet
        from the plain per-sample-kernel conv at batch 1 (docs/benchmarks.md).
        """
        d = self.__dict__
        cls = type(self)
        if cls is not DynamicConv2d and (cls.routing_weights is not DynamicConv2d.routing_weights
                                         or cls._observe_routing is not DynamicConv2d._observe_routing):
            return None  # a subclass that routes or observes differently: the general path calls its methods
        if self.training or self.backend != "auto" or not d.get("cache_weights", True) \
                or d.get("_routing_probe") is not None or self._masks_require_grad() or is_exporting():
            return None
        st, factors = _cached(self, "plan", self._factor_tensors(), self._inference_plan)
        if st.kind != "ones" and st.kind != "element":
            return None
        self._check_input_once(x)
        return factors

    @torch.no_grad()
    def _inference_plan(self) -> tuple["MaskStructure", tuple]:
        """``(structure, factors)`` for :meth:`_inference_forward` (see there)."""
        st = self.mask_structure()
        lam_s, lam_d = self.scales()
        if st.kind == "element":
            return st, _fold_static_into_dynamic(*self.combined_factors(), self.routing)
        if st.kind == "channel":
            dyn_rows, sta_rows, bias_dyn, bias_sta = self._channel_rows(st, lam_s, lam_d)
            order = st.order
            if self.groups == 1:  # static rows in whole blocks of the plain conv (inference only)
                sta_rows, order = aligned_static_rows(sta_rows, order)
            return st, (dyn_rows, sta_rows, bias_dyn, bias_sta, order)
        bias_dyn, bias_sta = self._bias_factors(lam_s, lam_d)
        if st.kind == "ones":
            return st, (self.weight_dynamic * lam_d, None, bias_dyn, bias_sta)
        return st, (self.weight_static * lam_s, bias_dyn, bias_sta)

    def _observe_routing(self, pi: Tensor, exporting: bool) -> None:
        """Running routing statistics (training) and an optional diagnostics probe (``pi [B, K]``)."""
        if exporting:
            return
        if self.training:
            self.update_routing_stats_(pi.detach().float().mean(0))
        probe = self.__dict__.get("_routing_probe")
        if probe is not None:
            probe.append(pi.detach().float())

    def _factor_tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the combined factors depend on (cache key material; read straight from the module's
        parameter / buffer dicts: this runs on every inference call)."""
        params, buffers = self._parameters, self._buffers
        tensors = [params["weight_dynamic"], params["weight_static"], buffers["mode_mask"]]
        phi = self._modules["scale"]._parameters.get("phi")
        if phi is not None:
            tensors.append(phi)
        if params.get("bias_dynamic") is not None:
            tensors += [params["bias_dynamic"], params["bias_static"], buffers["bias_mode_mask"]]
        return tuple(tensors + self.live_masks())

    def _bias_factors(self, lambda_s: Tensor, lambda_d: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(bias_dyn [K, O], bias_sta [O])`` with mask and scales folded in, or ``(None, None)``."""
        if self.bias_dynamic is None:
            return None, None
        return combine_factors(self.bias_dynamic, self.bias_static, self.bias_mode_mask, lambda_s, lambda_d)

    def _masks_require_grad(self) -> bool:
        buffers = self._buffers  # read directly: this runs on every forward
        mask, bias_mask = buffers["mode_mask"], buffers.get("bias_mode_mask")
        return mask.requires_grad or (bias_mask is not None and bias_mask.requires_grad)

    def mask_structure(self) -> "MaskStructure":
        """How the weight mask is structured (cached until the mask changes); see :class:`MaskStructure`."""
        if self.has_pruned():  # pruned entries: only the general (element) path multiplies by the live mask
            return MaskStructure("element")
        return _mask_structure(self, self.mode_mask)

    def _structured_forward(self, x: Tensor, pi: Tensor, st: "MaskStructure") -> Tensor:
        """Autograd fast paths for all-dynamic, all-static and channel-structured masks.

        Same function (and the same gradients, dead entries included: they get
        exact zeros) as the general path, without materialising the masked
        factors. (Inference uses the cached plan of :meth:`_inference_forward`.)
        """
        if st.kind == "channel":
            lambda_s, lambda_d = self.scales()
            if self.groups == 1:
                # wide outputs (grouped-conv territory): the whole layer as one masked dynamic conv,
                # the mask folded into its autograd (no weight-sized copies kept for the backward)
                n_dyn, n_sta = st.dynamic_index.numel(), st.static_index.numel()
                shape_rows = self.weight_dynamic.narrow(1, 0, n_dyn)  # decision by shapes: views, no copies
                if channel_split_runs_dense(x, pi, shape_rows, self.stride, self.padding, self.dilation, 1, "auto",
                                            self.weight_static.narrow(0, 0, n_sta), st.order):
                    return masked_dynamic_conv2d(
                        x, pi, self.weight_dynamic, self.weight_static, self.mode_mask, lambda_s, lambda_d,
                        *self._bias_factors(lambda_s, lambda_d), self.stride, self.padding, self.dilation, 1)
            return self._channel_split(x, pi, st, *self._channel_rows(st, lambda_s, lambda_d))
        lambda_s, lambda_d = self.scales()
        bias_dyn, bias_sta = self._bias_factors(lambda_s, lambda_d)
        if st.kind == "ones":  # scale the B x K routing weights, not the K kernels; dead static weight
            # gets exact zero gradients, as on the general path
            route = pi * _with_zero_grads(lambda_d, [self.weight_static]).to(pi.dtype)
            if bias_dyn is not None:  # the bias is mixed with the unscaled routing weights
                y = dynamic_conv2d(x, route, self.weight_dynamic, None, None, None, self.stride, self.padding,
                                   self.dilation, self.groups, "auto")
                return y + mix_bias(pi, bias_dyn, bias_sta)[:, :, None, None]
            return dynamic_conv2d(x, route, self.weight_dynamic, None, None, bias_sta, self.stride, self.padding,
                                  self.dilation, self.groups, "auto")
        weight = self.weight_static * _with_zero_grads(lambda_s, [self.weight_dynamic, pi])  # dead dynamic part
        return self._static_conv(x, pi, weight, bias_dyn, bias_sta)

    def _channel_rows(self, st: "MaskStructure", lambda_s: Tensor, lambda_d: Tensor) -> tuple:
        """Scaled factors of a channel-structured mask: ``(dyn_rows [K, O_dyn, C/g, kh, kw],
        sta_rows [O_sta, C/g, kh, kw], bias_dyn, bias_sta)``."""
        return (self.weight_dynamic.index_select(1, st.dynamic_index) * lambda_d,
                self.weight_static.index_select(0, st.static_index) * lambda_s,
                *self._bias_factors(lambda_s, lambda_d))

    def _channel_split(self, x: Tensor, pi: Tensor, st: "MaskStructure", dyn_rows: Tensor, sta_rows: Tensor,
                       bias_dyn, bias_sta, order: Tensor | None = None) -> Tensor:
        """The static and dynamic output channels as two convs, merged (:func:`channel_split_conv2d`);
        ``order`` defaults to ``st.order`` (the inference plan passes its own for padded static rows)."""
        return channel_split_conv2d(
            x, pi, dyn_rows, sta_rows, st.order if order is None else order, mix_bias(pi, bias_dyn, bias_sta),
            self.stride, self.padding,
            self.dilation, self.groups, "auto", st.static_index, st.dynamic_index,
        )

    def _static_conv(self, x: Tensor, pi: Tensor, weight: Tensor, bias_dyn, bias_sta) -> Tensor:
        """An all-static layer: one plain conv plus the (possibly dynamic) bias."""
        y = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        bias = mix_bias(pi, bias_dyn, bias_sta)
        return y if bias is None else y + bias[:, :, None, None]


def _fold_static_into_dynamic(dyn, sta, bias_dyn=None, bias_sta=None, routing="softmax"):
    """Softmax routing weights sum to one, so ``sum_k pi_k (W_k + W_s) = sum_k pi_k W_k + W_s``.

    Folding the static part into every dynamic factor (inference only) turns a
    PAD layer into a plain K-kernel dynamic conv: the output-space backend then
    runs K convs instead of K + 1, and weight space skips the static add.
    """
    if routing != "softmax" or sta is None or dyn is None:
        return dyn, sta, bias_dyn, bias_sta
    return dyn + sta, None, bias_dyn, bias_sta


def _mask_structure(module: nn.Module, mask: Tensor) -> "MaskStructure":
    """:class:`MaskStructure` of ``mask``, recomputed (host syncs) only when the mask changes.

    Kept apart from the inference cache: training frees that one, but must not
    re-analyse the mask every step.
    """
    cached = module.__dict__.get("_mask_structure_cache")
    if cached is not None and is_exporting():
        return cached[1]  # tracing: version counters are not meaningful, the mask is fixed
    key = (_tensor_key((mask,)), module.groups)
    if cached is None or cached[0] != key:
        cached = (key, MaskStructure.from_mask(mask, module.groups, module.in_channels))
        module.__dict__["_mask_structure_cache"] = cached
    return cached[1]


class MaskStructure:
    """Structure of a conv weight mask ``[O, C/groups, kh, kw]`` (1 = dynamic).

    ``kind``: ``"ones"`` (fully dynamic), ``"zeros"`` (fully static),
    ``"channel"`` (every output channel entirely dynamic or entirely static;
    only for ``groups == 1`` or depthwise) or ``"element"`` (anything else).
    For ``"channel"``: ``static_index`` / ``dynamic_index`` (long) list the
    static / dynamic output channels and ``order`` maps output channel ``o``
    to its column in ``cat([static_out, dynamic_out])``.
    """

    def __init__(self, kind: str, static_index: Tensor | None = None, dynamic_index: Tensor | None = None,
                 order: Tensor | None = None) -> None:
        self.kind = kind
        self.static_index = static_index
        self.dynamic_index = dynamic_index
        self.order = order

    @classmethod
    def from_mask(cls, mask: Tensor, groups: int = 1, in_channels: int | None = None) -> "MaskStructure":
        m = (mask.detach() > 0.5).flatten(1)
        row_dyn = m.all(dim=1)
        row_sta = ~m.any(dim=1)
        if bool(row_dyn.all()):
            return cls("ones")
        if bool(row_sta.all()):
            return cls("zeros")
        out_channels = m.shape[0]
        depthwise = groups > 1 and groups == out_channels and in_channels == out_channels
        if not bool((row_dyn | row_sta).all()) or not (groups == 1 or depthwise):
            return cls("element")
        static_index = row_sta.nonzero().squeeze(1)
        dynamic_index = row_dyn.nonzero().squeeze(1)
        order = torch.empty(out_channels, dtype=torch.long, device=mask.device)
        order[static_index] = torch.arange(static_index.numel(), device=mask.device)
        order[dynamic_index] = torch.arange(dynamic_index.numel(), device=mask.device) + static_index.numel()
        return cls("channel", static_index, dynamic_index, order)

    def __repr__(self) -> str:
        if self.kind != "channel":
            return f"MaskStructure({self.kind!r})"
        return f"MaskStructure('channel', static={self.static_index.numel()}, dynamic={self.dynamic_index.numel()})"


class _ZeroGradLink(torch.autograd.Function):
    """Identity on a small tensor (a 0-d scale) that hands exact zero gradients to ``tensors``.

    The fast paths skip multiplying dead factors by a zero mask; this keeps
    their ``.grad`` a zero tensor (not ``None``), exactly like the general path,
    so optimizers (weight decay, momentum) treat them identically. The carrier
    is returned as a fresh tensor (not a view of an input), so the layer's
    output stays an ordinary tensor that in-place activations may modify.
    """

    @staticmethod
    def forward(ctx, carrier, *tensors):
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return carrier.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs])


def _with_zero_grads(carrier: Tensor, tensors: list[Tensor]) -> Tensor:
    """``carrier`` (used by the forward) linked to ``tensors`` that must receive zero gradients."""
    if not torch.is_grad_enabled():
        return carrier
    live = [t for t in tensors if t.requires_grad]
    return _ZeroGradLink.apply(carrier, *live) if live else carrier


class CompactDynamicConv2d(_ConvGeometry, CompactLayerMixin, nn.Module):
    """Deploy form of :class:`DynamicConv2d`: live entries only, scales folded.

    Stores static entries once and dynamic entries K times
    (``weight``: :class:`PackedModeGroup`), the attention network, and the bias
    group if any. Same outputs as the source layer.

    The forward path follows the mask (with ``backend="auto"``):

    - all static: one plain ``F.conv2d`` on a zero-copy view of the packed
      static values (no routing at all unless the bias has dynamic entries);
    - all dynamic: the dynamic conv on a zero-copy view of the packed factors;
    - channel-structured (whole output channels static or dynamic): the packed
      static values *are* the static channels' conv weight and the packed
      dynamic values the dynamic channels' kernels (zero-copy views), so a
      plain conv runs on the static channels and a dynamic conv on the others;
    - element masks: dense ``(dyn, sta)`` rebuilt from the packed values and
      the fastest weight/output-space backend. Without autograd (inference)
      the dense factors are cached until the packed values change
      (``cache_weights=False`` disables; the cache is never saved).

    ``bias_shift`` (``[O]`` or ``None``) is an extra static bias, set by
    :meth:`fold_batchnorm_` when a folded BatchNorm's shift cannot go into the
    static bias (sigmoid routing with a dynamic bias, or no bias group).
    """

    def __init__(self, layer: DynamicConv2d) -> None:
        super().__init__()
        self._set_geometry(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.routing, layer.temperature, layer.backend)
        self.num_kernels = layer.num_kernels
        lambda_s, lambda_d = (s.detach() for s in layer.scales())
        groups = {g.name: g for g in layer.mode_groups()}
        self.weight = PackedModeGroup.from_group(groups["weight"], lambda_s, lambda_d)
        self.bias = PackedModeGroup.from_group(groups["bias"], lambda_s, lambda_d) if "bias" in groups else None
        self.attention = copy.deepcopy(layer.attention)
        self.register_parameter("bias_shift", None)
        self.cache_weights = True
        self._build_plan()  # analyse the mask now (host syncs happen here, not in the first forward)
        self.register_load_state_dict_post_hook(_rebuild_plan_after_load)

    # ---- plan: everything about the forward that the packed mask decides --------------------
    def _build_plan(self) -> "_DeployPlan":
        mask = self.weight.mask
        if self.weight.has_pruned or (self.bias is not None and self.bias.has_pruned):
            structure = MaskStructure("element")  # pruned entries: only the dense element path zeroes them
        else:
            structure = MaskStructure.from_mask(mask, self.groups, self.in_channels)
        plan = _DeployPlan(structure, tuple(mask.shape), self.weight.num_factors)
        self.__dict__["_plan"] = plan
        return plan

    def _refresh_plan(self) -> None:
        """Decide the plan again (the packed mask, device or values changed) and drop derived caches."""
        self.__dict__.pop("_inference_cache", None)
        self._build_plan()

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): the plan's index tensors follow
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_plan()
        return out

    @property
    def _static_only(self) -> bool:
        return self.weight.all_static and (self.bias is None or self.bias.all_static)

    def mask_structure(self) -> MaskStructure:
        """:class:`MaskStructure` of the packed weight mask (decided once; redone after load / ``.to()``)."""
        plan = self.__dict__.get("_plan") or self._build_plan()
        return plan.structure

    def _kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.mask.shape)

    def _factor_tensors(self) -> tuple[Tensor, ...]:
        """The tensors the dense weight factors are built from (inference cache keys)."""
        packed = self.weight
        return packed.static_values, packed.dynamic_values, packed.mask

    def dense_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """``(dyn [K, *shape] | None, sta [*shape] | None)`` rebuilt from the packed values.

        ``None`` stands for an all-zero part. Uses ``masked_scatter`` (static
        shapes, no ``nonzero``), so it also traces for export.
        """
        return _packed_dense(self.weight)

    def _cached_dense_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """Dense factors (element plans, wide channel plans): cached for inference, index scatter with autograd."""
        packed = self.weight
        if torch.is_grad_enabled():  # autograd: free the batch-1 packed copy (rebuilt by the next inference call)
            self.__dict__.get("_inference_cache", {}).pop("fused_packed", None)
        if packed.all_dynamic or is_exporting():
            return self.dense_factors()  # all dynamic: a zero-copy view, nothing worth caching
        grad = torch.is_grad_enabled() and (packed.static_values.requires_grad or packed.dynamic_values.requires_grad)
        if not grad and self.cache_weights:
            with torch.no_grad():
                return _cached(self, "dense", self._factor_tensors(),
                               lambda: _fold_static_into_dynamic(*self.dense_factors(), routing=self.routing)[:2])
        self.__dict__.get("_inference_cache", {}).pop("dense", None)  # training: free the inference copy
        if packed.all_static:
            return self.dense_factors()  # zero-copy view
        # autograd: index_copy (its backward is a parallel index_select; masked_scatter's is serial)
        plan = self.__dict__.get("_plan") or self._build_plan()
        sta_index, dyn_index = plan.scatter_index(packed)
        k = packed.num_factors
        sv, dv = packed.static_values, packed.dynamic_values
        sta = sv.new_zeros(packed.mask.numel()).index_copy(0, sta_index, sv).view(plan.shape)
        dyn = dv.new_zeros(k, sta.numel()).index_copy(1, dyn_index, dv).view(k, *plan.shape)
        return dyn, sta

    def _bias_parts(self) -> tuple[Tensor | None, Tensor | None]:
        """``(bias_dyn [K, O] | None, bias_sta [O] | None)`` including ``bias_shift``."""
        bias_dyn = bias_sta = None
        if self.bias is not None:
            bias_dyn, bias_sta = _packed_dense(self.bias)
        if self.bias_shift is not None:
            bias_sta = self.bias_shift if bias_sta is None else bias_sta + self.bias_shift
        return bias_dyn, bias_sta

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, O, H', W']`` by the plan the packed mask decided."""
        plan = self.__dict__.get("_plan") or self._build_plan()
        kind = plan.structure.kind
        if x.dim() == 4 and x.shape[0] == 1 and (kind == "ones" or kind == "element") and not torch.is_grad_enabled() \
                and self.backend == "auto" and not is_exporting():
            self._check_input_once(x)  # deploy latency: the shortest path
            return self._single_sample_call(x, *self._cached_dense_factors(), *self._bias_parts())
        self._check_input(x)
        bias_dyn, bias_sta = self._bias_parts()
        if self.backend != "auto":  # explicit backend: the literal dense computation (FLOP counting)
            dyn, sta = self.dense_factors()
            if dyn is None:
                dyn = sta.new_zeros((self.num_kernels, *sta.shape))
            return self._conv(x, self._route(x), dyn, sta, bias_dyn, bias_sta)
        st = plan.structure
        if st.kind == "zeros":  # a plain convolution (routing only for a dynamic bias)
            sta = self.weight.static_values.view(plan.shape)
            if bias_dyn is None:
                return F.conv2d(x, sta, bias_sta, self.stride, self.padding, self.dilation, self.groups)
            y = F.conv2d(x, sta, None, self.stride, self.padding, self.dilation, self.groups)
            return y + mix_bias(self._route(x), bias_dyn, bias_sta)[:, :, None, None]
        pi = self._route(x)
        if st.kind == "channel":
            dyn_rows = self.weight.dynamic_values.view(plan.dynamic_rows_shape)
            sta_rows = self.weight.static_values.view(plan.static_rows_shape)
            order = st.order
            if self.groups == 1 and not torch.is_grad_enabled() and self.cache_weights and not is_exporting():
                # static rows in whole blocks of the plain conv (a padded copy, cached for inference)
                sta_rows, order = _cached(self, "aligned_rows", (self.weight.static_values,),
                                          lambda: aligned_static_rows(sta_rows, st.order))
            else:
                self.__dict__.get("_inference_cache", {}).pop("aligned_rows", None)  # free the inference copy
            if not channel_split_runs_dense(x, pi, dyn_rows, self.stride, self.padding, self.dilation, self.groups,
                                            "auto", sta_rows, order):
                bias = mix_bias(pi, bias_dyn, bias_sta) if bias_dyn is not None else bias_sta
                return channel_split_conv2d(
                    x, pi, dyn_rows, sta_rows, order, bias, self.stride, self.padding, self.dilation,
                    self.groups, "auto", st.static_index, st.dynamic_index,
                )
            # wide outputs: one dynamic conv over all channels, from the (inference-cached) dense factors
        dyn, sta = self._cached_dense_factors()
        return self._conv(x, pi, dyn, sta, bias_dyn, bias_sta)

    # ---- BatchNorm folding ------------------------------------------------------------------
    @torch.no_grad()
    def fold_batchnorm_(self, bn: nn.BatchNorm2d) -> "CompactDynamicConv2d":
        """Fold an eval-mode BatchNorm that directly follows this layer into it, in place.

        ``BN(y) = a * y + c`` with ``a = gamma / sqrt(var + eps)`` and
        ``c = beta - a * mean`` per output channel. Every factor (static and the K
        dynamic ones, weights and biases) is scaled by ``a`` along its output
        channel -- exact for any routing, as the conv is linear in its kernel.
        The shift ``c`` goes into the static bias where that entry is static; for
        a dynamic bias entry it is added to all K dynamic values, which is exact
        only because softmax routing weights sum to one; with sigmoid routing (or
        without a bias group) it goes into the separate static ``bias_shift``.
        """
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"fold_batchnorm_ expects nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != self.out_channels:
            raise ValueError(f"BatchNorm has {bn.num_features} features, the conv {self.out_channels} channels")
        if bn.training or bn.running_mean is None or bn.running_var is None:
            raise ValueError("BatchNorm folding needs an eval-mode BatchNorm with running statistics "
                             "(call model.eval() first)")
        var = bn.running_var.double()
        a = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.double()
        c = -a * bn.running_mean.double()
        if bn.bias is not None:
            c = c + bn.bias.double()
        dtype = self.weight.static_values.dtype
        device = self.weight.mask.device
        a, c = a.to(device), c.to(device)

        mask = self.weight.mask
        channel = torch.arange(self.out_channels, device=device).view(-1, *([1] * (mask.dim() - 1))).expand_as(mask)
        sv, dv = self.weight.static_values, self.weight.dynamic_values
        sv.copy_((sv.double() * a[channel[self.weight.static_mask]]).to(dtype))
        dv.copy_((dv.double() * a[channel[mask]].unsqueeze(0)).to(dtype))

        shift = c
        if self.bias is not None:
            bm = self.bias.mask
            bsv, bdv = self.bias.static_values, self.bias.dynamic_values
            bsm = self.bias.static_mask
            new_static = bsv.double() * a[bsm] + c[bsm]
            new_dynamic = bdv.double() * a[bm].unsqueeze(0)
            shift = torch.zeros_like(c)
            if self.routing == "softmax":
                new_dynamic = new_dynamic + c[bm].unsqueeze(0)  # exact: sum_k pi_k = 1
            else:
                shift[bm] = c[bm]  # sigmoid weights do not sum to one: keep it static
            if self.bias.has_pruned:  # a pruned bias entry stores nothing: its shift goes to bias_shift
                shift[~self.bias.live] = c[~self.bias.live]
            bsv.copy_(new_static.to(dtype))
            bdv.copy_(new_dynamic.to(dtype))
        if self.bias_shift is not None:
            shift = self.bias_shift.double() * a + shift
        if self._needs_bias_shift() or self.bias_shift is not None:
            # created from the structure alone (not the values), so a folded model rebuilds the same way
            self.bias_shift = nn.Parameter(shift.to(dtype))
        self._refresh_plan()
        return self

    def _needs_bias_shift(self) -> bool:
        """Folding a BN shift needs a separate static bias: no bias group, or sigmoid with dynamic bias entries."""
        if self.bias is None or self.bias.has_pruned:
            return True
        return self.routing != "softmax" and not self.bias.all_static

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bias_shift"
        if key in state_dict and self.bias_shift is None:  # a BN-folded checkpoint
            ref = self.weight.static_values
            self.bias_shift = nn.Parameter(torch.zeros(self.out_channels, dtype=ref.dtype, device=ref.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask={self.mask_structure().kind!r}"


def _rebuild_plan_after_load(module: "CompactDynamicConv2d", incompatible_keys) -> None:
    """load_state_dict post hook: the loaded packed mask may differ, so decide the plan again."""
    module._refresh_plan()


class _DeployPlan:
    """What the packed weight mask decides once for every forward of a deploy-form conv.

    ``structure`` (:class:`MaskStructure`), the kernel ``shape`` ``[O, C/groups, kh, kw]``,
    the shapes of the channel plan's zero-copy row views, and (lazily) the
    flat static / dynamic entry indices used to scatter packed values with autograd.
    """

    __slots__ = ("structure", "shape", "static_rows_shape", "dynamic_rows_shape", "_scatter_index")

    def __init__(self, structure: MaskStructure, shape: tuple[int, ...], num_factors: int) -> None:
        self.structure = structure
        self.shape = shape
        n_dyn = structure.dynamic_index.numel() if structure.kind == "channel" else 0
        self.static_rows_shape = (shape[0] - n_dyn, *shape[1:])
        self.dynamic_rows_shape = (num_factors, n_dyn, *shape[1:])
        self._scatter_index = None

    def scatter_index(self, packed: PackedModeGroup) -> tuple[Tensor, Tensor]:
        """Flat indices ``(static entries, dynamic entries)`` of ``packed`` (pruned entries in neither)."""
        if self._scatter_index is None:
            self._scatter_index = (packed.static_mask.flatten().nonzero().squeeze(1),
                                   packed.mask.flatten().nonzero().squeeze(1))
        return self._scatter_index


def _packed_dense(packed: PackedModeGroup) -> tuple[Tensor | None, Tensor | None]:
    """``(dyn [K, *shape] | None, sta [*shape] | None)`` of a packed group; ``None`` = all zero.

    Zero-copy views when the group is all static or all dynamic; otherwise
    ``masked_scatter`` (static shapes, no ``nonzero``: traceable for export).
    """
    shape = tuple(packed.mask.shape)
    k = packed.num_factors
    if packed.all_dynamic:
        return packed.dynamic_values.view(k, *shape), None
    if packed.all_static:
        return None, packed.static_values.view(shape)
    mask = packed.mask
    sta = packed.static_values.new_zeros(shape).masked_scatter(packed.static_mask, packed.static_values)
    dyn = packed.dynamic_values.new_zeros((k, *shape)).masked_scatter(
        mask.unsqueeze(0).expand(k, *shape), packed.dynamic_values
    )
    return dyn, sta


def _inherit(static: Tensor, dynamic: Tensor, source: Tensor, noise_std: float, generator) -> None:
    static.copy_(source)
    std = float(source.float().std()) if source.numel() > 1 else float(source.float().abs().mean())
    for w in dynamic:
        noise = torch.randn(source.shape, generator=generator, dtype=torch.float32).to(source)
        w.copy_(source + noise_std * std * noise)
