"""torch.compile (inductor) rows: static conv vs PAD layers, eager and compiled, same process.

    python benchmarks/bench_compile.py [--shapes 64@32,512@4] [--batches 1,32] [--modes fwd,fwd+bwd]

Every figure is time / eager static conv of the same shape (interleaved, median
of --repeats rounds). Variants: ``static`` / ``static_compiled``,
``dynamic`` / ``dynamic_compiled`` (fully dynamic), ``compact_channel`` /
``compact_channel_compiled`` (kappa=0.3 channel mask after compact_). Compiled
outputs are checked against eager (max abs error in the row). Compilation
(C++ code generation) takes minutes on a busy 2-core machine; it is excluded
from the timings (warm-up).
"""

from __future__ import annotations

import torch
from _common import base_parser, log, setup, write

import latency


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--shapes", default="64@32,512@4")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    args = p.parse_args()
    info = setup(args)
    rows = []
    for item in args.shapes.split(","):
        channels, size = (int(v) for v in item.split("@"))
        base = latency.conv_layer_variants(channels, include=["dynamic", "compact_channel"])
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, channels, size, size)
            for mode in args.modes.split(","):
                fns, errors = {}, {}
                for name, module in base.items():
                    module.train(mode != "fwd")
                    if mode != "fwd" and name.startswith("compact"):
                        continue  # deploy forms are for inference
                    compiled = torch.compile(module)
                    make = latency._fwd if mode == "fwd" else latency._fwd_bwd
                    fns[name] = make(module, x)
                    fns[f"{name}_compiled"] = make(compiled, x)
                    if mode == "fwd":
                        with torch.no_grad():
                            errors[f"{name}_compiled"] = float((compiled(x) - module(x)).abs().max())
                timings = latency.time_interleaved(fns, repeats=args.repeats, warmup=2, min_round_s=0.02)
                ref = timings["static"].median
                for name, t in timings.items():
                    rows.append({"shape": f"{channels}@{size}x{size}", "batch": batch, "mode": mode,
                                 "variant": name, "ms": t.median * 1e3, "ratio": t.median / ref,
                                 "max_abs_err": errors.get(name, 0.0)})
                log(", ".join(f"{r['variant']}={r['ratio']:.2f}x" for r in rows[-len(timings):]))
    print(latency.format_rows(rows, ["shape", "batch", "mode", "variant", "ms", "ratio", "max_abs_err"]))
    write("compile", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
