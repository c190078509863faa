"""Run one benchmark script in several fresh processes and report the median of each figure.

    python benchmarks/fresh.py --runs 3 --name conv_layers -- \\
        python benchmarks/bench_conv_layers.py --threads 2 --repeats 15

Why: the same static conv measured 12.8 ms in one process and 21.3 ms in
another (glibc malloc state), so one process is one sample. Every script's
figures are already ratios to a static baseline measured interleaved *in the
same process*; this runner repeats the whole script ``--runs`` times, each in
a fresh interpreter with glibc's default malloc settings (``MALLOC_*``
variables are removed from the child environment unless ``--keep-malloc-env``),
and reports per row the median ratio over the processes, with its spread
(min..max), the median milliseconds, and the machine (CPU model, load) of
every run. Output: ``benchmarks/results/<name>.fresh.json`` and a Markdown
table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = ("ms", "ratio", "cpu_ratio", "load")
PER_RUN = ("tuned_picks", "fastest")  # decisions that may differ between processes: listed, not grouped by


def _row_key(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items()
                 if k not in MEASURED and k not in PER_RUN and not isinstance(v, float))


def aggregate(payloads: list[dict]) -> list[dict]:
    """Rows of every run grouped by their identity fields; medians (and spread) of the measured ones."""
    groups: dict[tuple, list[dict]] = {}
    for payload in payloads:
        for row in payload.get("rows", []):
            groups.setdefault(_row_key(row), []).append(row)
    out = []
    for key, rows in groups.items():
        agg = dict(key)
        agg["runs"] = len(rows)
        fields = {k for r in rows for k, v in r.items() if k != "load" and isinstance(v, float)}
        for field in sorted(fields):  # every measured figure: its median over the processes
            values = [r[field] for r in rows if isinstance(r.get(field), (int, float)) and math.isfinite(r[field])]
            if values:
                agg[field] = statistics.median(values)
                if field == "ratio":
                    agg["ratio_min"], agg["ratio_max"] = min(values), max(values)
        for field in PER_RUN:
            if any(field in r for r in rows):
                agg[field] = "/".join(str(r.get(field, "?")) for r in rows)
        loads = [r["load"] for r in rows if "load" in r]
        if loads:
            agg["load_max"] = max(loads)
        out.append(agg)
    return out


def geomeans(rows: list[dict]) -> dict[str, float]:
    """Geometric mean of the median ratios over shapes, per (batch, mode, variant) when rows have those fields."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if {"batch", "mode", "variant", "ratio"} <= r.keys():
            out.setdefault(f"B={r['batch']} {r['mode']} {r['variant']}", []).append(r["ratio"])
    return {k: math.exp(sum(math.log(v) for v in vs) / len(vs)) for k, vs in out.items()}


def autotune_gaps(rows: list[dict]) -> list[dict]:
    """Per (shape, batch, mode): ``dynamic`` (backend auto) vs the fastest forced backend (median ratios)."""
    by: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if {"shape", "batch", "mode", "variant", "ratio"} <= r.keys():
            by.setdefault((r["shape"], r["batch"], r["mode"]), {})[r["variant"]] = r["ratio"]
    gaps = []
    for (shape, batch, mode), v in by.items():
        forced = {n: v[n] for n in ("dynamic_weight", "dynamic_bmm", "dynamic_output") if n in v}
        if "dynamic" in v and forced:
            best = min(forced, key=forced.get)
            gaps.append({"shape": shape, "batch": batch, "mode": mode, "auto": v["dynamic"], "best": best,
                         "best_ratio": forced[best], "auto_over_best": v["dynamic"] / forced[best]})
    for r in rows:  # functional rows (bench_backends.py): auto vs the fastest backend, per process, median
        if "auto_over_fastest" in r:
            gaps.append({"shape": r["shape"], "batch": r["batch"], "mode": "fwd+bwd" if r.get("grad") else "fwd",
                         "auto": r["auto"], "best": r.get("fastest"), "best_ratio": None,
                         "auto_over_best": r["auto_over_fastest"]})
    return gaps


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="fresh processes (>= 3 for the docs)")
    p.add_argument("--name", required=True, help="result name: benchmarks/results/<name>.fresh.json")
    p.add_argument("--keep-malloc-env", action="store_true", help="do not strip MALLOC_* from the children")
    p.add_argument("--out", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command (must accept --out)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the benchmark command after --")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    env = dict(os.environ)
    if not args.keep_malloc_env:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    payloads = []
    with tempfile.TemporaryDirectory(prefix="padnet-fresh-") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.json"
            print(f"# run {i + 1}/{args.runs}: {' '.join(command)}", file=sys.stderr, flush=True)
            subprocess.run([*command, "--out", str(out)], env=env, check=True)
            payloads.append(json.loads(out.read_text()))
    rows = aggregate(payloads)
    result = {
        "command": command,
        "runs": args.runs,
        "malloc_env_stripped": not args.keep_malloc_env,
        "machines": [pl.get("machine") or pl.get("machine_before") for pl in payloads],
        "machines_after": [pl.get("machine_after") for pl in payloads],
        "rows": rows,
        "geomean": geomeans(rows),
        "autotune_gaps": autotune_gaps(rows),
    }
    path = Path(args.out) if args.out else RESULTS / f"{args.name}.fresh.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    cpu = {m.get("cpu_model") for m in result["machines"] if m}
    print(f"# {args.runs} fresh processes; CPU: {', '.join(sorted(map(str, cpu)))}; wrote {path}")
    columns = [c for c in ("shape", "batch", "mode", "variant", "tokens") if any(c in r for r in rows)]
    print(table(rows, columns + ["ratio", "ratio_min", "ratio_max", "ms", "load_max", "runs"]))
    if result["geomean"]:
        print("\ngeometric mean of the median ratios over shapes:")
        for k, v in result["geomean"].items():
            print(f"  {k}: {v:.2f}x")
    if result["autotune_gaps"]:
        worst = max(result["autotune_gaps"], key=lambda g: g["auto_over_best"])
        print(f"\nautotune: worst auto / fastest forced backend = {worst['auto_over_best']:.2f} "
              f"({worst['shape']} B={worst['batch']} {worst['mode']}, best {worst['best']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
