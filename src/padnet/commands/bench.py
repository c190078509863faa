"""``padnet bench``: layer / MoE / model latency suites (ratios vs static in the same run).

The suites are application code and live in the repository's ``benchmarks/``
directory (``benchmarks/latency.py``), not in the installed library. This
command runs them when that directory is available: ``--benchmarks-dir``,
``$PADNET_BENCHMARKS_DIR``, the source checkout padnet was imported from, or
``./benchmarks``; otherwise it stops with a message saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

SUITES = ("layers", "moe", "models", "all")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark dynamic layers and models against static baselines")
    p.add_argument("--suite", default="layers", choices=SUITES)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per measurement (median)")
    p.add_argument("--batches", default="1,32", help="layer suite batch sizes")
    p.add_argument("--shapes", default="64@32,128@16,256@8,512@4", help="layer suite shapes C@HW")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--tokens", default="512,4096", help="MoE suite token counts")
    p.add_argument("--variants", default=None, help="comma list: only these variants (static always included)")
    p.add_argument("--no-memory", action="store_true", help="model suite: skip peak memory")
    p.add_argument("--batch", type=int, default=32, help="model suite batch size")
    p.add_argument("--width", type=float, default=1.0, help="model suite ResNet-18 width multiplier")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--benchmarks-dir", default=None,
                   help="directory holding latency.py (default: $PADNET_BENCHMARKS_DIR, the source checkout, "
                        "./benchmarks)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _candidate_dirs(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    dirs = []
    if os.environ.get("PADNET_BENCHMARKS_DIR"):
        dirs.append(Path(os.environ["PADNET_BENCHMARKS_DIR"]))
    dirs.append(Path(__file__).resolve().parents[3] / "benchmarks")  # src/padnet/commands -> repository root
    dirs.append(Path.cwd() / "benchmarks")
    return dirs


def load_suites(explicit_dir: str | None = None) -> ModuleType:
    """Import ``latency.py`` from the first benchmarks directory that has it; clear error if none does."""
    tried = _candidate_dirs(explicit_dir)
    for directory in tried:
        path = directory / "latency.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("padnet_benchmarks_latency", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    raise SystemExit(
        "padnet bench: the benchmark suites are not installed with the library; they live in the "
        "benchmarks/ directory of a padnet source checkout. Pass --benchmarks-dir DIR (or set "
        f"PADNET_BENCHMARKS_DIR). Looked in: {', '.join(str(d) for d in tried)}"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    latency = load_suites(args.benchmarks_dir)

    torch.set_num_threads(args.threads)
    info = latency.machine_info()
    print(f"machine: {info}")
    include = args.variants.split(",") if args.variants else None
    modes = tuple(m for m in args.modes.split(",") if m)
    results = {"machine_before": info}
    suites = ("layers", "moe", "models") if args.suite == "all" else (args.suite,)
    for suite in suites:
        if suite == "layers":
            shapes = parse_shapes(args.shapes)
            batches = parse_positive_ints(args.batches, "--batches")
            rows = latency.conv_layer_suite(shapes, batches, modes, repeats=args.repeats, include=include, log=_log)
            print("\n## conv layers (ratio = time / static conv, same run)\n")
            print(latency.format_rows(rows, ["shape", "batch", "mode", "variant", "ms", "ratio", "cpu_ratio", "load"]))
            for batch in batches:
                for mode in modes:
                    sel = [r for r in rows if r["batch"] == batch and r["mode"] == mode]
                    names = sorted({r["variant"] for r in sel if r["variant"] != "static"})
                    gm = {n: latency.geomean(r["ratio"] for r in sel if r["variant"] == n) for n in names}
                    print(f"\ngeomean B={batch} {mode}: " + ", ".join(f"{n} {v:.2f}x" for n, v in gm.items()))
        elif suite == "moe":
            tokens = tuple(int(t) for t in args.tokens.split(","))
            rows = latency.moe_suite(tokens, modes=modes, repeats=args.repeats, log=_log)
            print("\n## MoE (ratio = time / dense FFN with 2*I intermediate, same run)\n")
            print(latency.format_rows(rows, ["tokens", "mode", "variant", "ms", "ratio", "cpu_ratio", "load"]))
        else:
            rows = latency.model_suite(batch=args.batch, repeats=max(1, args.repeats - 2), include=include,
                                       memory=not args.no_memory, train_step="fwd+bwd" in modes, log=_log,
                                       width=args.width)
            print("\n## ResNet-18 (small input, 32x32, batch 32; ratio = time / static, same run)\n")
            print(latency.format_rows(rows))
        results[suite] = rows
    results["machine_after"] = latency.machine_info()
    print(f"\nmachine after: {results['machine_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64@32,128@16"`` -> ``[(64, 32), (128, 16)]`` (channels @ spatial size, both >= 1)."""
    shapes = []
    for item in str(text).split(","):
        c, sep, hw = item.strip().partition("@")
        try:
            shape = (int(c), int(hw))
        except ValueError:
            shape = None
        if not sep or shape is None or min(shape) < 1:
            raise ValueError(f"--shapes: {item.strip()!r} is not CHANNELS@SIZE with positive integers (e.g. 64@32)")
        shapes.append(shape)
    return shapes


def parse_positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """``"1,32"`` -> ``(1, 32)``; every item an integer >= 1."""
    try:
        values = tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: expected comma-separated integers >= 1, got {text!r}")
    return values
