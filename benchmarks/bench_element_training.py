"""Element-PAD training against fully dynamic training, layer by layer (forward + backward).

    python benchmarks/bench_element_training.py [--batch 32] [--ratio 0.3] [--shapes 64@32,128@16,256@8,512@4]

Per shape ``C@HW`` (C -> C channels, 3x3, padding 1, K = 4, softmax routing,
``backend="auto"``, train mode): a fully dynamic :class:`padnet.layers.DynamicConv2d`
(``dynamic``), the same layer with a random element mask keeping ``--ratio`` of the
entries dynamic (``element``), and a plain ``nn.Conv2d`` (``static``, the baseline),
each timed as ``zero_grad + forward + backward``, interleaved in one process; ms,
median, and ratios to the static conv. ``element / dynamic`` is the issue-15
target (<= 1). ``extra_floor_ms``: the floor of ``gap_ms`` set by memory traffic, timed on
the same layer's tensors: with the same kernels, an element layer must still read its
extra tensors ``W_s`` and ``M`` in each of the three passes over the factors (the
forward's per-sample kernels, the backward's, the gradient pass) and write ``dL/dW_s``
once (``3 x dot(W_s, M)`` plus one copy of ``W_s``). Run under ``benchmarks/fresh.py``
for the median of fresh processes.
"""

from __future__ import annotations

import torch
from _common import base_parser, log, setup, write
from torch import nn

from latency import random_element_mask_, time_interleaved
from padnet.layers import DynamicConv2d


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
        w_s, mask = el.weight_static.detach().reshape(-1), el.mode_mask.reshape(-1)
        g_s = torch.empty_like(w_s)

        def extra_floor():
            # what the element layer must move beyond the fully dynamic one with the same kernels: W_s and
            # M read by each of the three passes over the factors (forward mix, the backward's mix, the
            # gradient pass) and dL/dW_s written once
            for _ in range(3):
                torch.dot(w_s, mask)
            g_s.copy_(w_s)

        fns = {n: step(m) for n, m in layers.items()}
        fns.update(extra_floor=extra_floor)
        t = time_interleaved(fns, repeats=args.repeats, warmup=2)
        row = {"shape": shape, "batch": args.batch, **{f"{n}_ms": v.median * 1e3 for n, v in t.items()}}
        row["extra_floor_ms"] = row.pop("extra_floor_ms")
        row["gap_ms"] = row["element_ms"] - row["dynamic_ms"]
        row["dynamic_over_static"] = row["dynamic_ms"] / row["static_ms"]
        row["element_over_static"] = row["element_ms"] / row["static_ms"]
        row["element_over_dynamic"] = row["element_ms"] / row["dynamic_ms"]
        rows.append(row)
        log(str({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    write("element_training", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
