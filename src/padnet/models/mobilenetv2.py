"""MobileNetV2 (torchvision-compatible layout).

At ``width_mult=1.0`` and ``small_input=False`` the module tree, parameter names
and parameter count (3,504,872 at 1000 classes) match torchvision's
``mobilenet_v2``. Channel counts are rounded with :func:`make_divisible` (nearest
multiple of 8, never more than 10% below the exact value).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .spec import records_spec

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "make_divisible", "mobilenet_v2"]

# (expand ratio t, output channels c, repeats n, first stride s)
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (>= ``min_value``),
    bumping up one step if that would lose more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _check_args(num_classes: int, in_chans: int, width_mult: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not (
        math.isfinite(width_mult) and width_mult > 0
    ):
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6 as children "0", "1", "2":
    [B, in_ch, H, W] -> [B, out_ch, H/stride, W/stride]."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when shapes
    allow: [B, in_ch, H, W] -> [B, out_ch, H/stride, W/stride]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: images [B, in_chans, H, W] -> logits [B, num_classes].

    ``small_input=True`` makes the stem stride 1 (total stride 16), for 28-32 px images.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_chans: int = 3,
        small_input: bool = False,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        _check_args(num_classes, in_chans, width_mult)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.small_input = bool(small_input)
        self.width_mult = float(width_mult)

        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        self.num_features = self.last_channel
        features: List[nn.Module] = [
            ConvBNReLU(in_chans, in_ch, stride=1 if small_input else 2)
        ]
        for t, c, n, s in _SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> feature map [B, last_channel, H', W']."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> logits [B, num_classes]."""
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


@records_spec("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    in_chans: int = 3,
    small_input: bool = False,
) -> MobileNetV2:
    """MobileNetV2 (3,504,872 params at 1000 classes, width 1.0)."""
    return MobileNetV2(num_classes, width_mult, in_chans, small_input)
