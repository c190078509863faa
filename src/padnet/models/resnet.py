"""ResNet family (torchvision-compatible layout).

At ``width=1.0`` and ``small_input=False`` the module tree, parameter names and
parameter counts match torchvision's ResNet v1.5 (stride on the 3x3 conv of the
Bottleneck), so torchvision state dicts load directly.

Width rule: every channel count ``c`` (stem 64, stages 64/128/256/512) becomes
``max(8, floor(c * width / 8 + 0.5) * 8)``, i.e. rounded half-up to the nearest
multiple of 8, never below 8. ``width=1.0`` gives the standard numbers exactly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from .spec import records_spec

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "scale_channels",
]

_STEM_CHANNELS = 64
_STAGE_CHANNELS = (64, 128, 256, 512)


def scale_channels(channels: int, width: float) -> int:
    """Scale a channel count by ``width``: nearest multiple of 8 (half up), at least 8."""
    return max(8, int(channels * width / 8 + 0.5) * 8)


def _check_args(num_classes: int, in_chans: int, width: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
        math.isfinite(width) and width > 0
    ):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity shortcut: [B, in_ch, H, W] -> [B, planes, H/s, W/s]."""

    expansion: int = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion:
    [B, in_ch, H, W] -> [B, 4 * planes, H/s, W/s]."""

    expansion: int = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet classifier: images [B, in_chans, H, W] -> logits [B, num_classes].

    ``small_input=True`` swaps the 7x7/2 stem + max-pool for a 3x3/1 stem and no
    pooling (``maxpool`` is ``nn.Identity``), suited to 28-32 px images.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_args(num_classes, in_chans, width)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.small_input = bool(small_input)
        self.width = float(width)
        self.stage_channels = [scale_channels(c, width) for c in _STAGE_CHANNELS]

        stem = scale_channels(_STEM_CHANNELS, width)
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )

        self._in_ch = stem
        self.layer1 = self._make_stage(block, self.stage_channels[0], layers[0], stride=1)
        self.layer2 = self._make_stage(block, self.stage_channels[1], layers[1], stride=2)
        self.layer3 = self._make_stage(block, self.stage_channels[2], layers[2], stride=2)
        self.layer4 = self._make_stage(block, self.stage_channels[3], layers[3], stride=2)
        self.num_features = self._in_ch
        del self._in_ch

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_residual)

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, out_ch, stride), nn.BatchNorm2d(out_ch)
            )
        stage = [block(self._in_ch, planes, stride, downsample)]
        self._in_ch = out_ch
        stage += [block(out_ch, planes) for _ in range(1, int(blocks))]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> feature map [B, num_features, H', W']."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> logits [B, num_classes]."""
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def _resnet(
    block: Block,
    layers: Sequence[int],
    num_classes: int,
    in_chans: int,
    small_input: bool,
    width: float,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(block, layers, num_classes, in_chans, small_input, width, zero_init_residual)


@records_spec("resnet10")
def resnet10(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    width: float = 1.0,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-10: BasicBlock, [1, 1, 1, 1]."""
    return _resnet(BasicBlock, [1, 1, 1, 1], num_classes, in_chans, small_input, width,
                   zero_init_residual)


@records_spec("resnet18")
def resnet18(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    width: float = 1.0,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2] (11,689,512 params at 1000 classes)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, small_input, width,
                   zero_init_residual)


@records_spec("resnet34")
def resnet34(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    width: float = 1.0,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3] (21,797,672 params at 1000 classes)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans, small_input, width,
                   zero_init_residual)


@records_spec("resnet50")
def resnet50(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    width: float = 1.0,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 (v1.5): Bottleneck, [3, 4, 6, 3] (25,557,032 params at 1000 classes)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, small_input, width,
                   zero_init_residual)
