"""Inference speed of the study's trained models, as ratios against the static model.

    python experiments/speed.py            # after experiments/study.py; run it on an idle machine

Loads seed 0 of each condition from ``runs/study/<name>/model.safetensors``,
deploys it the way a user would (``padnet.compact_``: only the live entries,
scale factors folded; the static model as trained), and times the forward pass
on Fashion-MNIST-shaped input (``[B, 1, 28, 28]``) at batch 64 and batch 1 with
the candidates interleaved round by round (median of ``--repeats``). Writes
``experiments/results/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import padnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the timing helpers live there
from latency import machine_info, time_interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "study"
OUT = ROOT / "experiments" / "results" / "speed.json"
CONDITIONS = ["fm-static", "fm-dynamic", "fm-pad-k0.1", "fm-pad-k0.3", "fm-pad-k0.5", "fm-pad-k0.7"]


def load_deployed(name: str) -> torch.nn.Module:
    model = padnet.load(RUNS / f"{name}-s0" / "model.safetensors").eval()
    if name != "fm-static":
        padnet.compact_(model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [c for c in CONDITIONS if not (RUNS / f"{c}-s0" / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"missing trained models (run experiments/study.py first): {missing}")
    models = {c: load_deployed(c) for c in CONDITIONS}
    torch.manual_seed(0)
    result = {"command": f"python experiments/speed.py --threads {args.threads} --repeats {args.repeats} "
                         f"--batch {args.batch}",
              "machine": machine_info(), "rows": {}}
    for label, batch in (("batch", args.batch), ("batch1", 1)):
        x = torch.randn(batch, 1, 28, 28)

        def forward(m, x=x):
            def fn():
                with torch.inference_mode():
                    m(x)
            return fn

        timings = time_interleaved({c: forward(m) for c, m in models.items()}, repeats=args.repeats, warmup=2)
        base = timings["fm-static"].median
        for c, t in timings.items():
            row = result["rows"].setdefault(c, {})
            row[f"{label}_ms"] = t.median * 1e3
            row[f"{label}_ratio"] = t.median / base
            row[f"{label}_iqr_ms"] = [t.q1 * 1e3, t.q3 * 1e3]
        print(f"{label} (B={batch}): static {base * 1e3:.2f} ms; "
              + ", ".join(f"{c}={t.median / base:.2f}x" for c, t in timings.items() if c != "fm-static"))
    result["batch"] = args.batch
    result["machine_after"] = machine_info()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
