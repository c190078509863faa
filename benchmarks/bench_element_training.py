"""Element-PAD training against fully dynamic training, layer by layer (forward + backward).

    python benchmarks/bench_element_training.py [--batch 32] [--ratio 0.3] [--shapes 64@32,128@16,256@8,512@4]

Per shape ``C@HW`` (C -> C channels, 3x3, padding 1, K = 4, softmax routing,
``backend="auto"``, train mode): a fully dynamic :class:`padnet.layers.DynamicConv2d`
(``dynamic``), the same layer with a random element mask keeping ``--ratio`` of the
entries dynamic (``element``), and a plain ``nn.Conv2d`` (``static``, the baseline),
each timed as ``zero_grad + forward + backward``, interleaved in one process; ms,
median, and ratios to the static conv. ``element / dynamic`` is the issue-15
target (<= 1). ``mask_passes_ms``: what the mask alone costs per step, timed on the
same layer's tensors -- forming the masked factors twice (forward, and again in the
backward) plus mapping the factor gradient back through the mask
(:mod:`padnet.ops.masked_factors`). Run under ``benchmarks/fresh.py`` for the median
of fresh processes.
"""

from __future__ import annotations

import torch
from _common import base_parser, log, setup, write
from torch import nn

from latency import random_element_mask_, time_interleaved
from padnet.layers import DynamicConv2d
from padnet.ops.masked_factors import folded_factor_grads, folded_factors


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--kernels", type=int, default=4)
    p.add_argument("--shapes", default="64@32,128@16,256@8,512@4")
    args = p.parse_args()
    info = setup(args)
    rows = []
    for shape in args.shapes.split(","):
        c, hw = (int(v) for v in shape.split("@"))
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, hw, hw)
        layers = {"static": nn.Conv2d(c, c, 3, padding=1, bias=False)}
        for name in ("dynamic", "element"):
            torch.manual_seed(0)
            layer = DynamicConv2d(c, c, 3, padding=1, bias=False, num_kernels=args.kernels)
            if name == "element":
                random_element_mask_(layer, args.ratio, torch.Generator().manual_seed(1))
            layers[name] = layer.train()

        def step(layer):
            def run():
                layer.zero_grad(set_to_none=True)
                layer(x).sum().backward()
            return run

        el = layers["element"]
        lambda_s, lambda_d = (t.detach() for t in el.scales())
        factor_grad = torch.randn_like(el.weight_dynamic)

        def mask_passes():
            with torch.no_grad():
                for _ in range(2):  # forward, and again in the backward
                    folded_factors(el.weight_dynamic, el.weight_static, el.mode_mask, lambda_s, lambda_d)
                folded_factor_grads(factor_grad.clone(), el.weight_dynamic, el.weight_static, el.mode_mask,
                                    lambda_s, lambda_d, True, True, True, True)

        def clone_only():  # subtracted: the gradient buffer the backward would have produced anyway
            factor_grad.clone()

        fns = {n: step(m) for n, m in layers.items()}
        fns.update(mask_passes=mask_passes, clone_only=clone_only)
        t = time_interleaved(fns, repeats=args.repeats, warmup=2)
        row = {"shape": shape, "batch": args.batch, **{f"{n}_ms": v.median * 1e3 for n, v in t.items()}}
        row["mask_passes_ms"] = row.pop("mask_passes_ms") - row.pop("clone_only_ms")
        row["gap_ms"] = row["element_ms"] - row["dynamic_ms"]
        row["dynamic_over_static"] = row["dynamic_ms"] / row["static_ms"]
        row["element_over_static"] = row["element_ms"] / row["static_ms"]
        row["element_over_dynamic"] = row["element_ms"] / row["dynamic_ms"]
        rows.append(row)
        log(str({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    write("element_training", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
