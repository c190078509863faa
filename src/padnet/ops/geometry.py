"""Conv geometry: padding forms, output size, and the checks that give clear errors."""

from __future__ import annotations

import numbers

from torch.nn.modules.utils import _pair


def padding4(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
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
        raise ValueError(f"unknown padding {padding!r}; expected an int, a pair, 'same' or 'valid'")
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


class ConvGeometry:
    """Conv hyper-parameters resolved once: kernel ``(kh, kw)``, stride, dilation, ``pad`` (t, b, l, r), groups."""

    __slots__ = ("kernel", "stride", "pad", "dilation", "groups")

    def __init__(self, kernel, stride, padding, dilation, groups: int) -> None:
        self.kernel = (int(kernel[0]), int(kernel[1]))
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.pad = padding4(padding, self.kernel, self.dilation)
        self.groups = int(groups)

    def out_hw(self, hw) -> tuple[int, int]:
        """Output ``(H', W')`` for an input of spatial size ``hw``; raises if the input is too small."""
        h, w = int(hw[0]), int(hw[1])
        ho = (h + self.pad[0] + self.pad[1] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + self.pad[2] + self.pad[3] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(
                f"input of spatial size {h}x{w} is smaller than the kernel: kernel_size={self.kernel}, "
                f"dilation={self.dilation}, padding={self.pad} (top, bottom, left, right) leave no output pixel"
            )
        return ho, wo

    @property
    def pointwise(self) -> bool:
        return self.kernel == (1, 1) and not any(self.pad) and self.dilation == (1, 1)


def check_conv_hyperparameters(kernel_size, stride, padding, dilation) -> None:
    """Positive kernel size, stride and dilation, non-negative padding (ints or pairs; padding also a string)."""
    for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("dilation", dilation, 1)):
        _check_int_pair(name, value, low)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"unknown padding {padding!r}; expected an int, a pair, 'same' or 'valid'")
        if padding == "same" and any(s != 1 for s in _pair(stride)):
            raise ValueError("padding='same' needs stride 1")
    else:
        _check_int_pair("padding", padding, 0)


def _check_int_pair(name: str, value, low: int) -> None:
    items = value if isinstance(value, (tuple, list)) else (value,)
    if len(items) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < low for v in items):
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


__all__ = ["ConvGeometry", "check_conv_hyperparameters", "padding4"]
