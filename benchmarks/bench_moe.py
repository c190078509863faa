"""MoE benchmark: top-2 of 4 experts vs a dense FFN with the same active parameters (2*I).

    python benchmarks/bench_moe.py [--tokens 512,4096] [--hidden 384 --intermediate 1536]

Variants: ``moe_layer`` (MoEFeedForward, combines masks every call),
``compact_moe`` (deploy form), ``dispatch_only`` (routing + padnet dispatch on
fixed effective weights), ``naive_dispatch_only`` (the original cat +
index_add dispatch, the peer baseline), ``dense_dispatch_only(export path)``.
"""

from __future__ import annotations

from _common import base_parser, log, setup, write

import latency


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--tokens", default="512,4096")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    args = p.parse_args()
    info = setup(args)
    rows = latency.moe_suite(
        tuple(int(t) for t in args.tokens.split(",")), args.hidden, args.intermediate, args.experts, args.top_k,
        modes=tuple(args.modes.split(",")), repeats=args.repeats, log=log,
    )
    print(latency.format_rows(rows, ["tokens", "mode", "variant", "ms", "ratio", "cpu_ratio", "load"]))
    write("moe", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
