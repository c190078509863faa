"""``padnet compare RUN_DIR...``: one markdown table of training runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COLUMNS = ["run", "variant", "kappa", "seed", "test acc", "best acc", "params total", "params dynamic", "FLOPs",
           "train time"]
SORT_KEYS = ("none", "test_accuracy", "params", "flops")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="markdown table of training runs (accuracy, deployable size, FLOPs, time)",
        description="Compare finished `padnet train` runs: variant, kappa, seed, test / best accuracy, deployable "
                    "parameters (total / dynamic), FLOPs per sample, training time.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--sort", choices=SORT_KEYS, default="none")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the table to FILE")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def compare_table(run_dirs: list[str | Path], sort: str = "none") -> tuple[str, list[str]]:
    """``(markdown table, skipped-run messages)``; raises ``ValueError`` if no run is complete."""
    from ..train.outputs import SUMMARY, fmt_flops, fmt_int, fmt_pct, fmt_seconds, markdown_table, read_json

    rows, skipped, summaries = [], [], []
    for d in run_dirs:
        d = Path(d)
        path = d / SUMMARY
        if not d.is_dir():
            skipped.append(f"{d}: no such directory")
            continue
        if not path.is_file():
            skipped.append(f"{d}: incomplete run (no summary.json)")
            continue
        summaries.append((d, read_json(path)))
    if not summaries:
        raise ValueError("no complete run to compare: " + "; ".join(skipped))
    if sort == "test_accuracy":
        summaries.sort(key=lambda x: -x[1]["test_accuracy"])
    elif sort == "params":
        summaries.sort(key=lambda x: x[1]["params"]["total"])
    elif sort == "flops":
        summaries.sort(key=lambda x: x[1].get("flops") or 0)
    for d, s in summaries:
        p = s["params"]
        rows.append([
            str(d), s["variant"], "-" if s.get("ratio") is None else f"{s['ratio']:g}", str(s["seed"]),
            fmt_pct(s["test_accuracy"]), fmt_pct(s["best_test_accuracy"]), fmt_int(p["total"]),
            fmt_int(p["dynamic"]), fmt_flops(s.get("flops")), fmt_seconds(s.get("train_seconds")),
        ])
    return markdown_table(rows, COLUMNS, align_right=set(range(3, len(COLUMNS)))), skipped


def run(args: argparse.Namespace) -> int:
    table, skipped = compare_table(args.run_dirs, args.sort)
    for msg in skipped:
        print(f"padnet compare: skipped {msg}", file=sys.stderr)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0
