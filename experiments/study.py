"""The PAD-Net reproduction study: every training run, driven through ``padnet train``.

    python experiments/study.py                       # run everything still missing (resumable)
    python experiments/study.py --group vision --jobs 2
    python experiments/study.py --list                # the grid and what is done

Each run trains into ``runs/study/<name>`` (git-ignored) and, once complete, its
``summary.json`` (plus the per-epoch metrics) is copied to
``experiments/results/<name>.json`` (committed). A run whose result file exists
is skipped; an interrupted run continues from its last epoch checkpoint
(``--resume``). Budget and settings: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "study"
SEEDS = (0, 1, 2)
KAPPAS = (0.1, 0.3, 0.5, 0.7)

# Budget (docs/results.md, "Settings"): a fixed 8,000-image subset of the Fashion-MNIST training set,
# 2 epochs, the full 10,000-image test set; the recipe's default model (ResNet-10, small stem, width 0.5).
VISION = ["--recipe", "fashion-mnist", "--epochs", "2", "--max-train-samples", "8000"]
# Movie sentiment with MiniLM-L6: a fixed 1,500-snippet training subset, 1 epoch (47 steps), the full
# 2,114-snippet test split; 15 fully dynamic warm-up steps before partitioning.
TEXT = ["--recipe", "movie-sentiment", "--epochs", "1", "--max-train-samples", "1500",
        "--partition-warmup-steps", "15"]


@dataclass(frozen=True)
class Run:
    name: str
    group: str  # vision | ablation | text
    args: tuple[str, ...]
    seed: int

    @property
    def result_path(self) -> Path:
        return RESULTS / f"{self.name}.json"

    @property
    def run_dir(self) -> Path:
        return RUNS / self.name


def grid() -> list[Run]:
    """All runs of the study: the main vision grid, text, then the vision ablations."""
    runs: list[Run] = []
    for seed in SEEDS:
        runs.append(Run(f"fm-static-s{seed}", "vision", (*VISION, "--variant", "static"), seed))
        runs.append(Run(f"fm-dynamic-s{seed}", "vision", (*VISION, "--variant", "dynamic"), seed))
        for kappa in KAPPAS:
            runs.append(Run(f"fm-pad-k{kappa}-s{seed}", "vision",
                            (*VISION, "--variant", "pad", "--ratio", str(kappa)), seed))
    for seed in SEEDS:
        runs.append(Run(f"text-static-s{seed}", "text", (*TEXT, "--variant", "static"), seed))
        runs.append(Run(f"text-moe-s{seed}", "text", (*TEXT, "--variant", "dynamic"), seed))
        runs.append(Run(f"text-pad-k0.5-s{seed}", "text", (*TEXT, "--variant", "pad", "--ratio", "0.5"), seed))
    for seed in SEEDS:  # kappa = 0.3 with taylor + learned scales is fm-pad-k0.3-s*
        for criterion in ("magnitude", "random"):
            runs.append(Run(f"fm-pad-k0.3-{criterion}-s{seed}", "ablation",
                            (*VISION, "--variant", "pad", "--ratio", "0.3", "--criterion", criterion), seed))
        runs.append(Run(f"fm-pad-k0.3-noscale-s{seed}", "ablation",
                        (*VISION, "--variant", "pad", "--ratio", "0.3", "--set", "pad_config.scale=none"), seed))
    return runs


def command(run: Run, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "padnet", "train", *run.args, "--seed", str(run.seed),
           "--output-dir", str(run.run_dir), "--threads", str(threads), "--quiet"]
    if (run.run_dir / "checkpoint.pt").is_file():
        cmd.append("--resume")
    elif run.run_dir.exists():
        cmd.append("--overwrite")  # started but no epoch finished: nothing to keep
    return cmd


def collect(run: Run) -> dict:
    """Copy a finished run's summary (+ metrics and the command) into the committed results."""
    summary = json.loads((run.run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary.pop("config", None)  # the full config stays in the run dir; the args below reproduce it
    record = {"name": run.name, "group": run.group, "seed": run.seed,
              "command": "padnet train " + " ".join([*run.args, "--seed", str(run.seed)]),
              "summary": summary, "metrics": metrics}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = run.result_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, run.result_path)
    return record


def execute(run: Run, threads: int) -> str:
    if run.result_path.is_file():
        return f"skip {run.name} (done)"
    if (run.run_dir / "summary.json").is_file():
        collect(run)
        return f"collected {run.name}"
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run.run_dir.parent / f"{run.name}.log"
    cmd = command(run, threads)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        return f"FAILED {run.name} (exit {rc}, log {log})"
    record = collect(run)
    acc = record["summary"]["test_accuracy"]
    return f"done {run.name}: test accuracy {acc:.4f} in {time.time() - t0:.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", action="append", choices=["vision", "ablation", "text"],
                   help="only these groups (repeatable; default all)")
    p.add_argument("--only", action="append", default=[], help="only runs whose name contains this")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--list", action="store_true", help="print the grid with its state and exit")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    runs = [r for r in grid() if (not args.group or r.group in args.group)
            and (not args.only or any(s in r.name for s in args.only))]
    if args.list:
        for r in runs:
            state = "done" if r.result_path.is_file() else (
                "partial" if (r.run_dir / "checkpoint.pt").is_file() else "todo")
            print(f"{state:8s} {r.group:9s} {r.name}")
        return 0
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for message in pool.map(lambda r: execute(r, args.threads), runs):
            print(message, flush=True)
            failures += message.startswith("FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
