"""Tensor image transforms (no torchvision).

Every transform takes a single image ``[C, H, W]`` or a batch ``[B, C, H, W]``
(``ToFloat`` takes ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` uint8). Random
transforms draw from torch's global RNG on the CPU, so ``torch.manual_seed``
makes them reproducible; on a batch every sample gets its own draw, and the
work itself runs on the batch's device (CPU or GPU).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Compose",
    "ToFloat",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Tensor) -> Tensor:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


FLOAT_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}


def float_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A floating-point ``torch.dtype`` from a dtype or its name (``"float16"``, ``"torch.float16"``, ...)."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"{what} must be a floating-point dtype, got {value}")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in FLOAT_DTYPES:
            return FLOAT_DTYPES[key]
    raise ValueError(f"{what} must be one of {', '.join(sorted(FLOAT_DTYPES))} (or a torch float dtype), "
                     f"got {value!r}")


class ToFloat:
    """uint8 ``[H, W]`` / ``[H, W, C]`` / ``[B, H, W, C]`` -> float channel-first in [0, 1].

    A floating-point input is only re-laid-out, not rescaled.
    """

    def __init__(self, dtype: torch.dtype | str = torch.float32) -> None:
        self.dtype = float_dtype(dtype)

    def __call__(self, img: Tensor) -> Tensor:
        if img.ndim == 2:
            img = img.unsqueeze(0)
        elif img.ndim == 3:
            img = img.permute(2, 0, 1)
        elif img.ndim == 4:
            img = img.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"ToFloat expects [H,W], [H,W,C] or [B,H,W,C], got shape {tuple(img.shape)}")
        scale = not img.is_floating_point()
        img = img.to(self.dtype).contiguous()
        return img.div_(255.0) if scale else img

    def __repr__(self) -> str:
        return f"ToFloat(dtype={self.dtype})"


class Normalize:
    """``(img - mean) / std`` per channel, for ``[C, H, W]`` or ``[B, C, H, W]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, img: Tensor) -> Tensor:
        channels = img.shape[-3]
        if len(self.mean) not in (1, channels):
            raise ValueError(f"Normalize has {len(self.mean)} channel stats, image has {channels} channels")
        mean = torch.tensor(self.mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        return (img - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomCrop:
    """Zero-pad by ``padding`` on each side, then crop a random ``size`` window."""

    def __init__(self, size: int | Sequence[int], padding: int = 0, fill: float = 0.0) -> None:
        self.size = _pair(size)
        self.padding = int(padding)
        self.fill = fill

    def __call__(self, img: Tensor) -> Tensor:
        if self.padding:
            p = self.padding
            img = F.pad(img, (p, p, p, p), value=self.fill)
        h, w = img.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:
            raise ValueError(f"crop size {self.size} larger than padded image {(h, w)}")
        if img.ndim == 4:  # per-sample offsets, gathered in one indexing op
            b = img.shape[0]
            top = torch.randint(0, h - th + 1, (b,)).to(img.device)
            left = torch.randint(0, w - tw + 1, (b,)).to(img.device)
            rows = top[:, None] + torch.arange(th, device=img.device)  # [B, th]
            cols = left[:, None] + torch.arange(tw, device=img.device)  # [B, tw]
            bi = torch.arange(b, device=img.device)[:, None, None, None]
            ci = torch.arange(img.shape[1], device=img.device)[None, :, None, None]
            return img[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
        top = int(torch.randint(0, h - th + 1, (1,)))
        left = int(torch.randint(0, w - tw + 1, (1,)))
        return img[..., top : top + th, left : left + tw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Flip the last (width) axis with probability ``p`` (per sample on a batch)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, img: Tensor) -> Tensor:
        if img.ndim == 4:
            flip = (torch.rand(img.shape[0]) < self.p).to(img.device).view(-1, 1, 1, 1)
            return torch.where(flip, img.flip(-1), img)
        if float(torch.rand(1)) < self.p:
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize ``[C, H, W]`` or ``[B, C, H, W]`` to ``size`` (int = square) with interpolate.

    Integer images are resized in float and rounded back to their dtype.
    """

    def __init__(self, size: int | Sequence[int], mode: str = "bilinear", antialias: bool = True) -> None:
        self.size = _pair(size)
        self.mode = mode
        self.antialias = antialias

    def __call__(self, img: Tensor) -> Tensor:
        single = img.ndim == 3
        x = img.unsqueeze(0) if single else img
        if x.ndim != 4:
            raise ValueError(f"Resize expects [C,H,W] or [B,C,H,W], got shape {tuple(img.shape)}")
        dtype = x.dtype
        if not dtype.is_floating_point:
            x = x.float()
        kwargs = {}
        if self.mode in ("bilinear", "bicubic"):
            kwargs = {"align_corners": False, "antialias": self.antialias}
        x = F.interpolate(x, size=self.size, mode=self.mode, **kwargs)
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            x = x.round_().clamp_(info.min, info.max).to(dtype)
        return x.squeeze(0) if single else x

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, mode={self.mode!r})"
