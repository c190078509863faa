"""Model-level benchmark: ResNet-18 (small input, 32x32) static / dynamic / PAD / compact.

    python benchmarks/bench_models.py [--batch 32] [--no-train-step] [--no-memory]

Images/s at --batch, batch-1 latency, a training step (fwd+bwd, train mode) and
peak forward memory (growth of the resident-set high-water mark, VmHWM reset via
/proc/self/clear_refs). PAD masks are built directly: random element mask at
kappa=0.3, or 30% of output channels per layer.
"""

from __future__ import annotations

from _common import base_parser, log, setup, write

import latency


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--no-train-step", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (smoke tests)")
    p.add_argument("--variants", default=None, help="comma list (static always included)")
    args = p.parse_args()
    info = setup(args)
    rows = latency.model_suite(
        batch=args.batch, ratio=args.ratio, repeats=args.repeats, train_step=not args.no_train_step,
        memory=not args.no_memory, include=args.variants.split(",") if args.variants else None, log=log,
        width=args.width,
    )
    print(latency.format_rows(rows))
    write("models", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
