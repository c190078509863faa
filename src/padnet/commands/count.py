"""``padnet count``: per-layer deployable-size table of a zoo model variant."""

from __future__ import annotations

import argparse

import torch

from ..transforms.counting import layer_counts
from ..transforms.flops import count_flops
from ..layers.modes import is_compact_layer, is_pad_layer
from .common import (add_model_args, add_variant_args, is_text_model, make_variant, random_inputs, resolve_ratio,
                     zoo_model)


def register(subparsers) -> None:
    p = subparsers.add_parser("count", help="deployable parameter counts (per layer) of a model variant")
    add_model_args(p)
    add_variant_args(p)
    p.add_argument("--image-size", type=int, default=None, help="vision models: also count FLOPs at this input size")
    p.add_argument("--seq-len", type=int, default=None, help="text models: also count FLOPs at this sequence length")
    p.set_defaults(func=run)


def format_table(model: torch.nn.Module) -> str:
    """Markdown-style table: one row per PAD layer plus the rest and the total."""
    counts = layer_counts(model)
    modules = dict(model.named_modules())
    rows = [("layer", "type", "K", "kappa", "static", "dynamic", "router", "other", "total")]
    total = None
    for name, c in counts.items():
        module = modules.get(name)
        if module is not None and (is_pad_layer(module) or is_compact_layer(module)):
            k = str(getattr(module, "num_kernels", getattr(module, "num_experts", "")))
            kappa = f"{module.dynamic_ratio():.3f}" if is_pad_layer(module) else "-"
            kind = type(module).__name__
        else:
            k, kappa, kind = "", "", "(rest of the model)"
        rows.append((name, kind, k, kappa, f"{c.static:,}", f"{c.dynamic:,}", f"{c.router:,}", f"{c.other:,}",
                     f"{c.total:,}"))
        total = c if total is None else total + c
    rows.append(("TOTAL", "", "", "", f"{total.static:,}", f"{total.dynamic:,}", f"{total.router:,}",
                 f"{total.other:,}", f"{total.total:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    ratio = resolve_ratio(args.variant, args.ratio)
    model = make_variant(zoo_model(args), args.variant, ratio, args.num_kernels)
    print(f"{args.model} ({args.variant}{'' if ratio is None else f', kappa={ratio}'})")
    print(format_table(model))
    if args.image_size and not is_text_model(args.model):
        x = torch.randn(1, args.in_chans, args.image_size, args.image_size)
        print(f"FLOPs per image at {args.image_size}px: {count_flops(model, x):,}")
    elif args.seq_len and is_text_model(args.model):
        x = random_inputs(model.eval(), 1, seq_len=args.seq_len)
        print(f"FLOPs per sequence of {args.seq_len} tokens: {count_flops(model, x):,}")
    elif args.image_size or args.seq_len:
        raise ValueError(f"{'--image-size' if args.image_size else '--seq-len'} does not fit "
                         f"{'text' if is_text_model(args.model) else 'vision'} model {args.model!r}; use "
                         f"{'--seq-len' if is_text_model(args.model) else '--image-size'}")
    return 0
