"""Arguments and helpers shared by several CLI verbs."""

from __future__ import annotations

import argparse

from torch import nn

from ..transforms.config import DynamicConvConfig, PadConfig, check_ratio
from ..transforms.dynamize import dynamize_
from ..models import create_model, list_models, width_argument

VARIANTS = ("static", "dynamic", "pad")


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "resnet50") -> None:
    parser.add_argument("--model", default=default_model, choices=list_models(), help="zoo model")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--small-input", action="store_true", help="3x3 stem, no max-pool (28-32 px images)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier")


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="pad", choices=VARIANTS)
    parser.add_argument("--ratio", type=float, default=None, help="dynamic ratio kappa in (0, 1] (pad only)")
    parser.add_argument("--num-kernels", type=int, default=4, help="K: kernels per dynamic conv")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def zoo_model(args: argparse.Namespace) -> nn.Module:
    kwargs = {"num_classes": args.num_classes, "in_chans": args.in_chans, "small_input": args.small_input}
    kwargs[width_argument(args.model)] = args.width
    return create_model(args.model, **kwargs)


def resolve_ratio(variant: str, ratio: float | None, default: float = 0.3) -> float | None:
    """kappa for the variant: required range for pad, refused for static/dynamic."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant != "pad":
        if ratio is not None and ratio != 1.0:
            raise ValueError(f"--ratio is only meaningful with --variant pad (got variant {variant!r})")
        return None
    return check_ratio(default if ratio is None else ratio, "ratio")


def magnitude_partition_(model: nn.Module, ratio: float) -> None:
    """Data-free mode partition for size accounting (global magnitude criterion)."""
    from ..partition import partition_

    partition_(model, None, None, ratio=ratio, criterion="magnitude", iterations=1)


def make_variant(model: nn.Module, variant: str, ratio: float | None, num_kernels: int = 4) -> nn.Module:
    """Static model as is; dynamic = dynamize_; pad = dynamize_ + data-free partition at ``ratio``."""
    if variant == "static":
        return model
    dynamize_(model, PadConfig(conv=DynamicConvConfig(num_kernels=num_kernels), seed=0))
    if variant == "pad":
        magnitude_partition_(model, ratio)
    return model
