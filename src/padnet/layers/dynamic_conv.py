"""Partially dynamic 2-D convolution (DY-Conv / CondConv with PAD modes)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .conv_functional import BACKENDS, dynamic_conv2d
from .modes import CompactLayerMixin, PackedModeGroup, PadLayerMixin, ScaleFactors, combine_factors, register_mask

ROUTINGS = ("softmax", "sigmoid")


class KernelAttention(nn.Module):
    """Routing network: global average pool -> Linear -> ReLU -> Linear (K logits).

    ``forward(x [B, C, H, W]) -> logits [B, K]``.
    """

    def __init__(self, in_channels: int, num_kernels: int, reduction: int, device=None, dtype=None) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, num_kernels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(pooled)))


def routing_from_logits(logits: Tensor, routing: str, temperature: float) -> Tensor:
    """Routing weights ``[B, K]`` from logits: softmax(z / T) or sigmoid(z / T)."""
    z = logits / temperature
    if routing == "softmax":
        low_precision = z.dtype in (torch.float16, torch.bfloat16)
        return torch.softmax(z.float() if low_precision else z, dim=-1).to(logits.dtype)
    return torch.sigmoid(z)


def _check_conv_args(in_channels: int, out_channels: int, groups: int, num_kernels: int, reduction: int) -> None:
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

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, routing,
                      temperature, backend) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
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

    def routing_weights(self, x: Tensor) -> Tensor:
        """Routing weights ``[B, K]`` for input ``x [B, C, H, W]``, temperature applied."""
        self._check_input(x)
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
    ) -> None:
        super().__init__()
        _check_conv_args(in_channels, out_channels, groups, num_kernels, reduction)
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
        self.attention = KernelAttention(in_channels, num_kernels, reduction, **factory)
        self.scale = ScaleFactors(scale, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init for every kernel and the static copy."""
        for w in (*self.weight_dynamic, self.weight_static):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias_dynamic is not None:
            fan_in = self.weight_static[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias_dynamic, -bound, bound)
            nn.init.uniform_(self.bias_static, -bound, bound)

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

        ``init="inherit"``: ``W_s = W`` and ``W_k = W + noise_std * std(W) * N(0, 1)``
        (the noise breaks the symmetry that would zero the Taylor scores);
        ``init="fresh"``: default random init. Bias follows the same rule.
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
        dyn, sta = combine_factors(self.weight_dynamic, self.weight_static, self.mode_mask, lambda_s, lambda_d)
        if self.bias_dynamic is None:
            return dyn, sta, None, None
        bias_dyn, bias_sta = combine_factors(
            self.bias_dynamic, self.bias_static, self.bias_mode_mask, lambda_s, lambda_d
        )
        return dyn, sta, bias_dyn, bias_sta

    def aggregated_weight(self, x: Tensor) -> Tensor:
        """Per-sample kernels ``W_hat(x)`` ``[B, O, C/groups, kh, kw]`` (reference / analysis)."""
        pi = self.routing_weights(x)
        dyn, sta, _, _ = self.combined_factors()
        return torch.einsum("bk,k...->b...", pi, dyn) + sta

    def forward(self, x: Tensor) -> Tensor:
        pi = self.routing_weights(x)
        return self._conv(x, pi, *self.combined_factors())


class CompactDynamicConv2d(_ConvGeometry, CompactLayerMixin, nn.Module):
    """Deploy form of :class:`DynamicConv2d`: live entries only, scales folded.

    Stores static entries once and dynamic entries K times
    (``weight``: :class:`PackedModeGroup`), the attention network, and the bias
    group if any. Same outputs as the source layer.
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
        self._static_only = self.weight.all_static and (self.bias is None or self.bias.all_static)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self._static_only:  # no routing needed at all: a plain convolution
            sta = self.weight.materialize()[1]
            bias = self.bias.materialize()[1] if self.bias is not None else None
            return F.conv2d(x, sta, bias, self.stride, self.padding, self.dilation, self.groups)
        pi = self.routing_weights(x)
        dyn, sta = self.weight.materialize()
        bias_dyn, bias_sta = self.bias.materialize() if self.bias is not None else (None, None)
        return self._conv(x, pi, dyn, sta, bias_dyn, bias_sta)


def _inherit(static: Tensor, dynamic: Tensor, source: Tensor, noise_std: float, generator) -> None:
    static.copy_(source)
    std = float(source.float().std()) if source.numel() > 1 else float(source.float().abs().mean())
    for w in dynamic:
        noise = torch.randn(source.shape, generator=generator, dtype=torch.float32).to(source)
        w.copy_(source + noise_std * std * noise)
