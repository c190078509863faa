"""Measurements of issue 11 (mode transitions, initialisation, routing) -- docs/partition.md, docs/training.md.

    python experiments/transitions_study.py partition   # dynamic -> static at kappa 0.3, preserve vs not
    python experiments/transitions_study.py routing     # routing spread vs accuracy, 2 epochs on 2,500 images
    python experiments/transitions_study.py report      # the table of docs/training.md

One intra-op thread (the machine is shared); results go to
``experiments/results/transitions-*.json``. Training runs use the padnet
trainer (``padnet.train``); the analysis uses padnet.transforms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RUNS = Path("/tmp/padnet-transitions-runs")


def run_training(name: str, flags: dict) -> Path:
    from padnet.train import resolve_config, train

    out = RUNS / name
    flags = {"recipe": "fashion-mnist", "model": "resnet10", "threads": 1, "quiet": True, "seed": 0,
             "output_dir": str(out), **flags}
    cfg = resolve_config(flags)
    if not (out / "summary.json").exists():
        train(cfg, overwrite=True)
    return out


def test_batches(cfg_flags: dict, n: int | None, batch_size: int = 500, train: bool = False):
    from padnet.train import resolve_config
    from padnet.train.loop import subset
    from padnet.train.recipes import get_recipe

    cfg = resolve_config({"recipe": "fashion-mnist", **cfg_flags})
    recipe = get_recipe(cfg.recipe)
    data = recipe.build_data(cfg)
    ds = subset(data.train if train else data.test, n, seed=1 if train else 0)
    tf = recipe.batch_transform(cfg, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    return [(tf(x), y) for x, y in loader]


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, float]:
    model.eval()
    loss = correct = count = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        count += len(y)
    return loss / count, correct / count


def routing_summary(model, batches) -> dict:
    from padnet.transforms.diagnostics import mean_of, routing_diagnostics, routing_probe

    model.eval()
    with routing_probe(model) as probe, torch.no_grad():
        for x, _ in batches:
            model(x)
    diag = routing_diagnostics(model, probe)
    return {"layers": {k: {kk: vv for kk, vv in v.items() if kk != "pi_mean"} for k, v in diag.items()},
            "pi_std": mean_of(diag, "pi_std"), "pi_std_min": min(v["pi_std"] for v in diag.values()),
            "pi_std_max": max(v["pi_std"] for v in diag.values()),
            "entropy_normalized": mean_of(diag, "entropy_normalized"),
            "kernel_spread": mean_of(diag, "kernel_spread")}


def cmd_partition(args) -> None:
    import padnet
    from padnet.transforms.partition import partition_

    width = args.width
    flags = {"variant": "dynamic", "epochs": 1, "width": width, "max_test_samples": args.test,
             **CONFIGS[args.config]}
    if args.train is not None:
        flags["max_train_samples"] = args.train
    suffix = "" if args.config == "after" else f"-{args.config}"
    t0 = time.time()
    out = run_training(f"dyn-w{width}-n{args.train}{suffix}", flags)
    train_seconds = time.time() - t0
    tests = test_batches(flags, args.test)
    part = test_batches(flags, 4 * 128, batch_size=128, train=True)  # the trainer's 4 partition batches
    result = {"config": args.config, "width": width, "max_train_samples": args.train, "test_samples": args.test,
              "train_wall_seconds_this_call": train_seconds, "ratio": 0.3, "criterion": "taylor",
              "iterations": 5, "partition_batches": 4}
    base = padnet.load(out / "model.safetensors")
    result["fully_dynamic"] = dict(zip(("test_loss", "test_accuracy"), evaluate(base, tests)))
    for preserve in (True, False):
        model = padnet.load(out / "model.safetensors")
        rep = partition_(model, part, torch.nn.CrossEntropyLoss(), ratio=0.3, iterations=5, preserve=preserve,
                         train_mode=True, seed=0)
        loss, acc = evaluate(model, tests)
        result[f"preserve={preserve}"] = {"test_loss": loss, "test_accuracy": acc, "kappa": rep.ratio,
                                          "to_static": rep.transition["to_static"]}
    for key in ("preserve=True", "preserve=False"):
        result[key]["loss_increase"] = result[key]["test_loss"] - result["fully_dynamic"]["test_loss"]
    result["loss_increase_ratio"] = (result["preserve=False"]["loss_increase"]
                                     / max(result["preserve=True"]["loss_increase"], 1e-12))
    path = RESULTS / f"transitions-partition-w{width}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


OFFICIAL = {"init": "fresh", "router_init": "official"}


def _schedule(start: float, end: float = 1.0, fraction: float | None = None, epochs: float = 3.0) -> dict:
    """Explicit temperature settings (independent of the recipe defaults of the day)."""
    return {"temperature_start": start, "temperature_end": end, "temperature_anneal_fraction": fraction,
            "temperature_epochs": epochs}


CONFIGS = {
    # the defaults before issue 11: inherited kernels + 1 % noise, torch router init, 30 -> 1 over the first
    # min(3 epochs, half the run) = 1 epoch
    "before": {"pad_config": {"init": "inherit", "router_init": "torch"}, **_schedule(30.0)},
    "fresh-torch-T1": {"pad_config": {"init": "fresh", "router_init": "torch"}, **_schedule(1.0)},
    "fresh-official-T1": {"pad_config": OFFICIAL, **_schedule(1.0)},
    "fresh-official-30to1-10pct": {"pad_config": OFFICIAL, **_schedule(30.0, 1.0, 0.1)},
    "fresh-official-30to1-half": {"pad_config": OFFICIAL, **_schedule(30.0)},
    "fresh-torch-30to1-10pct": {"pad_config": {"init": "fresh", "router_init": "torch"},
                                **_schedule(30.0, 1.0, 0.1)},
    "inherit-official-30to1-10pct": {"pad_config": {"init": "inherit", "router_init": "official"},
                                     **_schedule(30.0, 1.0, 0.1)},
    "fresh-official-30to3-10pct": {"pad_config": OFFICIAL, **_schedule(30.0, 3.0, 0.1)},
    "fresh-official-30to5-10pct": {"pad_config": OFFICIAL, **_schedule(30.0, 5.0, 0.1)},
    "fresh-official-30to2-10pct": {"pad_config": OFFICIAL, **_schedule(30.0, 2.0, 0.1)},
    # the first recipe defaults of issue 11 (fresh, official router, 30 -> 3 over the first 10 %), pinned
    "after": {"pad_config": OFFICIAL, **_schedule(30.0, 3.0, 0.1)},
    "bn-30to3-10pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 3.0, 0.1)},
    "bn-30to5-10pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 5.0, 0.1)},
    "bn-30to2-10pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 2.0, 0.1)},
    "bn-30to2.5-10pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 2.5, 0.1)},
    "bn-30to2-half": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 2.0)},
    "bn-30to2-30pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 2.0, 0.3)},
    "bn-30to3-half": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 3.0)},
    "bn-30to2.5-half": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 2.5)},
    "recipe-defaults": {},  # whatever the recipe defaults are today (checks the bn-30to2-half row is them)
    "bn-30to1-10pct": {"pad_config": {**OFFICIAL, "router_norm": "batch"}, **_schedule(30.0, 1.0, 0.1)},
}


def cmd_routing(args) -> None:
    import padnet

    names = args.configs or list(CONFIGS)
    path = RESULTS / (args.results or "transitions-routing.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        for seed in args.seeds:
            key = f"{name}/seed{seed}"
            if key in results and not args.force:
                continue
            flags = {"variant": "dynamic", "epochs": 2, "width": 0.25, "max_train_samples": 2500,
                     "max_test_samples": args.test, "seed": seed, **CONFIGS[name]}
            t0 = time.time()
            out = run_training(f"routing-{name}-s{seed}", flags)
            summary = json.loads((out / "summary.json").read_text())
            model = padnet.load(out / "model.safetensors")
            row = {"config": CONFIGS[name], "test_accuracy": summary["test_accuracy"],
                   "test_loss": summary["test_loss"], "seconds": time.time() - t0,
                   **routing_summary(model, test_batches(flags, args.test))}
            results[key] = row
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(key, {k: row[k] for k in ("test_accuracy", "pi_std", "entropy_normalized", "kernel_spread")},
                  flush=True)


DESCRIPTIONS = {
    "before": "before issue 11: inherit + 1 % noise, torch router init, T 30 -> 1 over 1 epoch",
    "fresh-torch-T1": "fresh kernels, torch router init, T = 1",
    "fresh-official-T1": "fresh, official router init, T = 1",
    "fresh-official-30to1-10pct": "fresh, official router, T 30 -> 1 over 10 %",
    "fresh-official-30to1-half": "fresh, official router, T 30 -> 1 over 1 epoch",
    "fresh-torch-30to1-10pct": "fresh, torch router, T 30 -> 1 over 10 %",
    "inherit-official-30to1-10pct": "inherit, official router, T 30 -> 1 over 10 %",
    "fresh-official-30to5-10pct": "fresh, official router, T 30 -> 5 over 10 %",
    "fresh-official-30to3-10pct": "fresh, official router, T 30 -> 3 over 10 %",
    "fresh-official-30to2-10pct": "fresh, official router, T 30 -> 2 over 10 %",
    "after": "first defaults of issue 11: fresh, official router, T 30 -> 3 over 10 %",
    "bn-30to5-10pct": "fresh, official router + BatchNorm, T 30 -> 5 over 10 %",
    "bn-30to3-10pct": "fresh, official router + BatchNorm, T 30 -> 3 over 10 %",
    "bn-30to2.5-10pct": "fresh, official router + BatchNorm, T 30 -> 2.5 over 10 %",
    "bn-30to2-10pct": "fresh, official router + BatchNorm, T 30 -> 2 over 10 %",
    "bn-30to1-10pct": "fresh, official router + BatchNorm, T 30 -> 1 over 10 %",
    "bn-30to2-30pct": "fresh, official router + BatchNorm, T 30 -> 2 over 30 %",
    "bn-30to3-half": "fresh, official router + BatchNorm, T 30 -> 3 over 1 epoch",
    "bn-30to2.5-half": "fresh, official router + BatchNorm, T 30 -> 2.5 over 1 epoch",
    "bn-30to2-half": "**recipe defaults: fresh, official router + BatchNorm, T 30 -> 2 over 1 epoch**",
}


def cmd_report(args) -> None:
    """Markdown table of every routing result file (mean over seeds)."""
    import statistics

    rows: dict[str, list[dict]] = {}
    for path in sorted(RESULTS.glob("transitions-routing*.json")):
        for key, row in json.loads(path.read_text()).items():
            rows.setdefault(key.split("/")[0], []).append(row)
    base = statistics.mean(r["pi_std"] for r in rows["before"])

    def per_layer(rs: list[dict]) -> dict[str, float]:  # pi std of each layer, mean over the seeds
        return {name: statistics.mean(r["layers"][name]["pi_std"] for r in rs) for name in rs[0]["layers"]}

    base_layers = per_layer(rows["before"])
    print("| configuration | seeds | test accuracy | pi std (layers min-max) | x before | per layer: min x before, "
          "layers >= 4x | entropy | kernel spread |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in DESCRIPTIONS:
        if name not in rows:
            continue
        rs = rows[name]
        acc = [100 * r["test_accuracy"] for r in rs]
        acc_s = f"{statistics.mean(acc):.1f} %" + (f" (±{statistics.stdev(acc):.1f})" if len(acc) > 1 else "")
        std = statistics.mean(r["pi_std"] for r in rs)
        lo, hi = min(r["pi_std_min"] for r in rs), max(r["pi_std_max"] for r in rs)
        ratios = [v / base_layers[layer] for layer, v in per_layer(rs).items()]
        print(f"| {DESCRIPTIONS[name]} | {len(rs)} | {acc_s} | {std:.4f} ({lo:.4f}-{hi:.4f}) | {std / base:.1f}x | "
              f"{min(ratios):.1f}x, {sum(x >= 4 for x in ratios)} / {len(ratios)} | "
              f"{statistics.mean(r['entropy_normalized'] for r in rs):.3f} | "
              f"{statistics.mean(r['kernel_spread'] for r in rs):.4f} |")


def main(argv=None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("partition")
    a.add_argument("--width", type=float, default=0.25)
    a.add_argument("--train", type=int, default=None, help="training subset (default: the full 60,000)")
    a.add_argument("--test", type=int, default=10000)
    a.add_argument("--config", default="after", choices=sorted(CONFIGS),
                   help="training settings (default: the ones docs/partition.md's table was measured with)")
    b = sub.add_parser("routing")
    b.add_argument("--configs", nargs="*")
    b.add_argument("--seeds", type=int, nargs="*", default=[0])
    b.add_argument("--test", type=int, default=2000)
    b.add_argument("--force", action="store_true")
    b.add_argument("--results", help="result file name under experiments/results (parallel sweeps)")
    sub.add_parser("report")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    {"partition": cmd_partition, "routing": cmd_routing, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
