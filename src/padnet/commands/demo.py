"""``padnet demo``: a short end-to-end PAD-Net run on Fashion-MNIST (a few minutes on 2 CPU cores).

Trains a PAD ResNet-10 (small width, a subset of the data, partitioned at init
with IMP to kappa = 0.3), evaluates it, prints its deployable size next to the
fully dynamic and static ones, exports the compact deploy form
(``padnet.compact_`` + ``padnet.save`` -> ``compact.safetensors``) and checks
that the compact model's outputs match.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

DEMO_DEFAULTS = {
    "epochs": 2,
    "max_train_samples": 6000,
    "max_test_samples": 2000,
    "width": 0.25,
    "ratio": 0.3,
    "batch_size": 64,
    "lr": 0.05,
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="short end-to-end PAD-Net demo on Fashion-MNIST (train, partition, size, export)",
        description="Train a PAD ResNet-10 on a Fashion-MNIST subset (partitioned at init), evaluate it, compare "
                    "its deployable size with the fully dynamic and static models, export the compact model and "
                    "verify its outputs. A few minutes on 2 CPU cores.",
    )
    p.add_argument("--output-dir", default="runs/demo", help="run directory (replaced on every demo run)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST directory (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"])
    p.add_argument("--max-train-samples", type=int, default=DEMO_DEFAULTS["max_train_samples"])
    p.add_argument("--max-test-samples", type=int, default=DEMO_DEFAULTS["max_test_samples"])
    p.add_argument("--width", type=float, default=DEMO_DEFAULTS["width"])
    p.add_argument("--ratio", type=float, default=DEMO_DEFAULTS["ratio"], help="dynamic ratio kappa")
    p.add_argument("--criterion", default="taylor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: ~90 s even on a busy shared 2-core machine, where "
                        "spin-waiting OpenMP threads made 2 threads many times slower; raise it on an idle machine)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..transforms.counting import count_parameters
    from ..transforms.compact import compact_
    from ..io.serialization import load, save
    from ..train import resolve_config, train
    from ..train.loop import to_device
    from ..train.outputs import fmt_int, fmt_pct, write_json
    from ..train.recipes import get_recipe

    started = time.perf_counter()
    settings = {
        "recipe": "fashion-mnist", "variant": "pad", "model": "resnet10", "ratio": args.ratio,
        "criterion": args.criterion, "epochs": args.epochs, "max_train_samples": args.max_train_samples,
        "max_test_samples": args.max_test_samples, "width": args.width, "batch_size": DEMO_DEFAULTS["batch_size"],
        "lr": DEMO_DEFAULTS["lr"], "seed": args.seed, "output_dir": args.output_dir, "quiet": args.quiet,
        "nproc": args.nproc, "temperature_epochs": 0.5,
    }
    if args.data_dir is not None:
        settings["data_dir"] = args.data_dir
    if args.threads:
        settings["threads"] = args.threads
    cfg = resolve_config(settings)
    out = Path(cfg.output_dir)
    print(f"padnet demo: PAD ResNet-10 (width {cfg.width}) on {cfg.max_train_samples:,} Fashion-MNIST images, "
          f"{cfg.epochs} epoch(s), IMP ({cfg.criterion}) to kappa={cfg.ratio} at init -> {out}", flush=True)
    summary = train(cfg, overwrite=True)

    # deploy form: compact_, save, reload, compare outputs
    model = load(out / "model.safetensors").eval()
    compact = compact_(copy.deepcopy(model)).eval()
    save(compact, out / "compact.safetensors")
    reloaded = load(out / "compact.safetensors").eval()
    recipe = get_recipe(cfg.recipe)
    data = recipe.build_data(cfg)
    items = [data.test[i] for i in range(min(256, len(data.test)))]
    inputs, _ = torch.utils.data.default_collate(items)
    x = to_device(recipe.batch_transform(cfg, train=False)(inputs), torch.device("cpu"))
    with torch.no_grad():
        ref = model(x)
        got = reloaded(x)
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max()) or 1.0
    match = diff <= 1e-4 * max(1.0, scale) and bool((ref.argmax(-1) == got.argmax(-1)).all())
    pad_p, full_p, static_p = summary["params"], summary["params_fully_dynamic"], summary["params_static"]
    compact_p = count_parameters(reloaded).to_dict()
    sizes = {
        "model.safetensors": (out / "model.safetensors").stat().st_size,
        "compact.safetensors": (out / "compact.safetensors").stat().st_size,
    }
    verify = {"max_abs_diff": diff, "outputs_match": match, "compact_params": compact_p, "file_bytes": sizes}
    write_json(out / "compact_check.json", verify)

    w = max(len(fmt_int(v["total"])) for v in (pad_p, full_p, static_p))
    print()
    print(f"test accuracy (PAD, {summary['num_test_samples']:,} test images): {fmt_pct(summary['test_accuracy'])}")
    print("deployable parameters (dynamic entries count K=4 times, static entries once):")
    print(f"  static ResNet-10           {fmt_int(static_p['total']).rjust(w)}")
    print(f"  fully dynamic (kappa=1)    {fmt_int(full_p['total']).rjust(w)}")
    print(f"  PAD (kappa={summary['partition']['ratio']:.2f})           {fmt_int(pad_p['total']).rjust(w)}   "
          f"({pad_p['total'] / full_p['total']:.1%} of fully dynamic; dynamic {fmt_int(pad_p['dynamic'])}, "
          f"static {fmt_int(pad_p['static'])})")
    print(f"compact export: {out / 'compact.safetensors'} ({sizes['compact.safetensors'] / 1e6:.2f} MB; training "
          f"form {sizes['model.safetensors'] / 1e6:.2f} MB), {fmt_int(compact_p['total'])} parameters")
    print(f"compact outputs {'match' if match else 'DO NOT match'} the PAD model (max |diff| {diff:.2e} on "
          f"{x.shape[0]} images)")
    print(f"report: {out / 'report.md'}   total time {time.perf_counter() - started:.0f} s")
    return 0 if match else 1
