"""Shared helpers of the padnet speed benchmarks (run from the repository root)."""

from __future__ import annotations

import argparse
import json
import os

# Waiting OpenMP threads sleep instead of spinning: on a shared, oversubscribed
# machine spinning steals the CPU the other worker needs, and CPU-time ratios
# (reported next to wall-time ratios) then count work only. Must precede torch.
# PADNET_BENCH_OMP_WAIT_POLICY=default leaves OpenMP's own default (what users
# get: spin, then sleep), which matters for latency of many small ops (batch 1).
_OMP_POLICY = os.environ.get("PADNET_BENCH_OMP_WAIT_POLICY", "PASSIVE")
if _OMP_POLICY != "default":
    os.environ.setdefault("OMP_WAIT_POLICY", _OMP_POLICY)
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the spec: 2)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument("--max-load", type=float, default=None,
                   help="wait (up to --wait-s) until the 1-minute load average is below this")
    p.add_argument("--wait-s", type=float, default=600.0)
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/<name>.json)")
    return p


def setup(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.max_load is not None:
        deadline = time.time() + args.wait_s
        while os.getloadavg()[0] > args.max_load and time.time() < deadline:
            time.sleep(10)
    from latency import machine_info

    info = machine_info()
    print(f"# machine: {info}", file=sys.stderr, flush=True)
    return info


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write(name: str, args, payload: dict) -> Path:
    from latency import machine_info

    payload["machine_after"] = machine_info()
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    log(f"# wrote {path}")
    return path
