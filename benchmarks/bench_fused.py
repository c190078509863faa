"""The fused C++ kernel (padnet.ops.fused) against the PyTorch backends, inference.

    python benchmarks/bench_fused.py [--shapes 512@4,256@8,128@16] [--batch 32]

Every figure is time / static conv of the same shape (interleaved, same
process); the row also holds the fused kernel's max abs error against the
grouped-conv backend. Builds the kernel if it is not cached yet (about a minute; PADNET_FUSED=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("PADNET_FUSED", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import base_parser, log, setup, write  # noqa: E402

from latency import time_interleaved  # noqa: E402
from padnet import ops  # noqa: E402
from padnet.ops import fused  # noqa: E402
from padnet.ops.geometry import ConvGeometry  # noqa: E402


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--shapes", default="512@4,256@8,128@16")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    info = setup(args)
    if fused.load_fused() is None:
        raise SystemExit("the fused kernel is unavailable (no compiler?)")
    rows = []
    for item in args.shapes.split(","):
        c, hw = (int(v) for v in item.split("@"))
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, hw, hw)
        pi = torch.softmax(torch.randn(args.batch, 4), -1)
        dyn = torch.randn(4, c, c, 3, 3) * 0.01
        geom = ConvGeometry((3, 3), 1, 1, 1, 1)
        with torch.no_grad():
            ref = ops.dynamic_conv2d(x, pi, dyn, None, padding=1, backend="weight")
            err = float((fused.fused_dynamic_conv2d(x, pi, dyn, None, geom, 1) - ref).abs().max())
            fns = {"static": lambda: F.conv2d(x, dyn[0], None, 1, 1)}
            for name in ("weight", "bmm", "output"):
                fns[name] = lambda name=name: ops.dynamic_conv2d(x, pi, dyn, None, padding=1, backend=name)
            fns["fused"] = lambda: fused.fused_dynamic_conv2d(x, pi, dyn, None, geom, 1)
            timings = time_interleaved(fns, repeats=args.repeats, warmup=1)
        base = timings["static"].median
        for name, t in timings.items():
            rows.append({"shape": f"{c}@{hw}x{hw}", "batch": args.batch, "mode": "fwd", "variant": name,
                         "ms": t.median * 1e3, "ratio": t.median / base, "fused_max_abs_err": err})
        log(f"{item}: " + ", ".join(f"{n}={t.median / base:.2f}x" for n, t in timings.items()))
    write("fused", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
