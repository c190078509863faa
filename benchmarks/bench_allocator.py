"""How much glibc's allocator moves CPU conv timings: the same layers with default and fixed malloc thresholds.

    python benchmarks/bench_allocator.py

glibc serves large allocations (above a dynamic threshold, at most 32 MiB)
with fresh ``mmap`` pages and returns freed heap tops to the OS, so a
per-call temporary of a few MiB (a conv output, per-sample kernels) can be
page-faulted in again on every call, depending on the process's allocation
history. This script times the static conv, the fully dynamic layer and the
kappa=0.3 compact layers at 64@32 and 128@16 (batch 32) in two fresh
processes: glibc defaults, and ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` fixed high (what ``benchmarks/run_all.sh`` sets;
jemalloc or tcmalloc have the same effect).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _common import base_parser, log, setup, write

FIXED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}

CHILD = """
import json, os, torch
torch.set_num_threads({threads})
from latency import conv_layer_variants, time_interleaved
rows = []
for c, hw in ((64, 32), (128, 16)):
    v = conv_layer_variants(c, include=["dynamic", "compact_element", "compact_channel"])
    for m in v.values():
        m.eval()
    x = torch.randn(32, c, hw, hw)
    with torch.no_grad():
        t = time_interleaved({{k: (lambda m=m: m(x)) for k, m in v.items()}}, repeats={repeats}, min_round_s=0.02)
    base = t["static"].median
    row = {{"shape": f"{{c}}@{{hw}}", "static_ms": base * 1e3}}
    row.update({{k: tt.median / base for k, tt in t.items() if k != "static"}})
    rows.append(row)
print(json.dumps(rows))
"""


def main() -> None:
    p = base_parser(__doc__)
    args = p.parse_args()
    info = setup(args)
    out = {}
    for label, extra in (("glibc_default", {}), ("fixed_thresholds", FIXED)):
        env = {k: v for k, v in os.environ.items() if k not in FIXED}
        env.update(extra)
        code = CHILD.format(threads=args.threads, repeats=args.repeats)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))  # the child imports latency.py
        if res.returncode:
            raise SystemExit(f"{label} child failed:\n{res.stderr}")
        out[label] = json.loads(res.stdout.strip().splitlines()[-1])
        log(f"{label}: {out[label]}")
    write("allocator", args, {"machine": info, "settings": FIXED, "runs": out})


if __name__ == "__main__":
    main()
