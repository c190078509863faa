"""Functional backend comparison (calibrates the ``backend="auto"`` rule and the bmm tile budgets).

    python benchmarks/bench_backends.py [--batches 1,8,32] [--grad]

Times ``dynamic_conv2d`` with each concrete backend on the ResNet-18 3x3
shapes (fully dynamic, K=4, no static part) against ``F.conv2d`` of the same
shape, interleaved, and prints which backend the rule picks. Also prints the
cost model terms: FLOP ratio of weight space ``1 + K/L`` and output space ``K``,
and the bytes of per-sample kernels ``B * P * 4`` that weight space must write
and read (or keep in cache when tiled).
"""

from __future__ import annotations

from _common import base_parser, log, setup, write  # noqa: I001  (sets OMP_WAIT_POLICY before torch loads)

import torch
import torch.nn.functional as F

from latency import format_rows, time_interleaved
from padnet import ops as cf
from padnet.ops import bmm_kernels
from padnet.ops.autotune import autotune_enabled
from padnet.ops.backend_selection import resolve_backend, resolve_single_sample_backend


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--shapes", default="64@32,128@16,256@8,512@4")
    p.add_argument("--batches", default="32")
    p.add_argument("--kernels", type=int, default=4)
    p.add_argument("--grad", action="store_true", help="time forward+backward instead of forward")
    p.add_argument("--rotate", action="store_true",
                   help="rotate the candidates' order every round (auto runs after a different backend each time)")
    p.add_argument("--budgets", default="", help="extra bmm tile budgets 'W/C' in MiB, e.g. 4/8,32/32")
    args = p.parse_args()
    info = setup(args)
    k = args.kernels
    rows = []
    for shape in args.shapes.split(","):
        c, hw = (int(v) for v in shape.split("@"))
        for b in (int(v) for v in args.batches.split(",")):
            torch.manual_seed(0)
            x = torch.randn(b, c, hw, hw, requires_grad=args.grad)
            w = (torch.randn(c, c, 3, 3) * 0.05).requires_grad_(args.grad)
            dyn = (torch.randn(k, c, c, 3, 3) * 0.05).requires_grad_(args.grad)
            pi = torch.softmax(torch.randn(b, k), -1).requires_grad_(args.grad)
            gy = torch.randn(b, c, hw, hw)

            def run(fn):
                if not args.grad:
                    def f():
                        with torch.no_grad():
                            fn()
                    return f
                return lambda: fn().backward(gy)

            fns = {"static": run(lambda: F.conv2d(x, w, padding=1))}
            for name in cf.CONCRETE_BACKENDS:
                fns[name] = run(lambda name=name: cf.dynamic_conv2d(x, pi, dyn, None, padding=1, backend=name))
            # backend="auto" as users get it: autotuned on its first call (the warm-up), else the cost rule
            fns["auto"] = run(lambda: cf.dynamic_conv2d(x, pi, dyn, None, padding=1, backend="auto"))
            if not args.grad:  # the memory traffic of materialising B per-sample kernels, alone
                flat = dyn.detach().reshape(k, -1)
                buf = torch.empty(b, flat.shape[1])
                fns["aggregate_only"] = lambda flat=flat, buf=buf: torch.mm(pi.detach(), flat, out=buf)
            default = dict(bmm_kernels.TILE_BUDGET)
            for spec in filter(None, args.budgets.split(",")):
                wb, cb = (int(v) << 20 for v in spec.split("/"))

                def tiled(wb=wb, cb=cb):
                    bmm_kernels.TILE_BUDGET.update(weights=wb, cols=cb)
                    try:
                        return cf.dynamic_conv2d(x, pi, dyn, None, padding=1, backend="bmm")
                    finally:
                        bmm_kernels.TILE_BUDGET.update(default)
                fns[f"bmm[{spec}]"] = run(tiled)
            t = time_interleaved(fns, repeats=args.repeats, min_round_s=0.02, rotate=args.rotate)
            base = t["static"].median
            choice = cf.select_backend("auto", b, c, 1, out_pixels=hw * hw, requires_grad=args.grad)
            with torch.set_grad_enabled(args.grad):
                tuned = resolve_backend(x, pi, dyn, None, 1, 1, 1, 1, "auto")  # the decision "auto" ran with
                if b == 1 and not args.grad:  # batch 1 has its own choice: aggregate + plain conv, or fused
                    tuned = resolve_single_sample_backend(x, pi, dyn, None, 1, 1, 1, 1)
            row = {"shape": shape, "batch": b, "grad": args.grad, "static_ms": base * 1e3}
            row.update({n: v.median / base for n, v in t.items() if n != "static"})
            cbase = t["static"].cpu_median
            row.update({f"cpu:{n}": v.cpu_median / cbase for n, v in t.items() if n != "static"})
            fastest = min(cf.CONCRETE_BACKENDS, key=lambda n: row[n])
            row.update({"auto_picks": choice, "tuned_picks": tuned, "autotune": autotune_enabled(),
                        "fastest": fastest, "auto_over_fastest": row["auto"] / row[fastest], "flops_weight": 1 + k / (hw * hw), "flops_output": float(k),
                        "kernel_bytes_MiB": b * c * c * 9 * 4 / 2**20})
            rows.append(row)
            log(str(row))
    print(format_rows(rows))
    write("backends_grad" if args.grad else "backends", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
