"""Layer-level dynamic conv benchmark: ResNet-18 3x3 shapes, static vs naive vs padnet.

    python benchmarks/bench_conv_layers.py [--batches 1,32] [--modes fwd,fwd+bwd]

Every figure is time / static conv of the same shape, measured interleaved in
the same run (median of --repeats rounds). Variants: ``naive_grouped`` (per-sample
kernels + grouped conv with groups=B: today's common implementation, the peer
baseline), ``dynamic`` (padnet DynamicConv2d, backend="auto"), ``dynamic_bmm`` /
``dynamic_output`` (forced backends), PAD kappa=0.3 element / channel masks in
training form and after compact_ (``compact_*``).
"""

from __future__ import annotations

from _common import base_parser, log, setup, write

import latency


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--shapes", default="64@32,128@16,256@8,512@4")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--variants", default=None, help="comma list (static always included)")
    args = p.parse_args()
    info = setup(args)
    shapes = [tuple(int(v) for v in s.split("@")) for s in args.shapes.split(",")]
    batches = tuple(int(b) for b in args.batches.split(","))
    modes = tuple(args.modes.split(","))
    include = args.variants.split(",") if args.variants else None
    rows = latency.conv_layer_suite(shapes, batches, modes, repeats=args.repeats, include=include, log=log)
    print(latency.format_rows(rows, ["shape", "batch", "mode", "variant", "ms", "ratio", "cpu_ratio", "load"]))
    summary = {}
    for b in batches:
        for m in modes:
            sel = [r for r in rows if r["batch"] == b and r["mode"] == m]
            for v in sorted({r["variant"] for r in sel}):
                summary[f"B={b} {m} {v}"] = latency.geomean(r["ratio"] for r in sel if r["variant"] == v)
                summary[f"B={b} {m} {v} (cpu)"] = latency.geomean(r["cpu_ratio"] for r in sel if r["variant"] == v)
    print("\ngeometric mean of time / static over the shapes:")
    for k, v in summary.items():
        print(f"  {k}: {v:.2f}x")
    write("conv_layers", args, {"machine": info, "rows": rows, "geomean": summary})


if __name__ == "__main__":
    main()
