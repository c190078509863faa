"""``padnet train``: train a recipe's model as static, dynamic or PAD (see docs/training.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

S = argparse.SUPPRESS  # only explicit flags reach the namespace (they override the config file)


def _set_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        import yaml

        value = yaml.safe_load(raw) if raw.strip() else raw
    except Exception:
        value = raw
    return key.strip().replace("-", "_"), value


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", default=S, help="recipe name (default fashion-mnist; see --list-recipes)")
    g.add_argument("--variant", default=S, help="static | dynamic | pad (default pad)")
    g.add_argument("--ratio", "--target-ratio", dest="ratio", type=float, default=S,
                   help="dynamic ratio kappa in (0, 1], pad only (default 0.3)")
    g.add_argument("--model", default=S, help="model (vision: a zoo name, e.g. resnet10, resnet18, mobilenet_v2)")
    g.add_argument("--width", type=float, default=S, help="channel width multiplier of the zoo model")
    g.add_argument("--num-kernels", type=int, default=S, help="K: kernels per dynamic conv / experts per MoE (4)")
    g = p.add_argument_group("mode partition (pad)")
    g.add_argument("--criterion", default=S, help="partition criterion (default taylor)")
    g.add_argument("--partition-iterations", type=int, default=S, help="IMP iterations T (default 5)")
    g.add_argument("--partition-schedule", default=S, help="kept-ratio schedule (default exponential)")
    g.add_argument("--partition-scope", default=S, help="global | layer (default global)")
    g.add_argument("--partition-granularity", default=S, help="element | kernel | channel (default element)")
    g.add_argument("--partition-batches", type=int, default=S, help="training batches scored per iteration (4)")
    g.add_argument("--partition-warmup-steps", "--partition-at-step", dest="partition_warmup_steps", type=int,
                   default=S, help="0: partition at init; N: after N fully dynamic optimizer steps")
    g.add_argument("--partition-preserve", action=argparse.BooleanOptionalAction, default=S,
                   help="function-preserving mode transitions when partitioning (default on; "
                        "--no-partition-preserve: masks only, as the paper at init)")
    g = p.add_argument_group("learned mode gates (pad, --partition gates; docs/partition.md)")
    g.add_argument("--partition", default=S, help="imp (Iterative Mode Partition, default) | gates (learned gates)")
    g.add_argument("--gate-estimator", default=S, help="hard_concrete (default) | arm")
    g.add_argument("--gate-init", default=S, help="open (sparsify, default) | hibernate (expand)")
    g.add_argument("--gate-sharpness", type=float, default=S, help="hard concrete 1/beta (1.5) or ARM k (7)")
    g.add_argument("--gate-sharpness-end", type=float, default=S, help="sharpness at the end of the schedule")
    g.add_argument("--gate-schedule", default=S, help="constant | linear | geometric | npn (arm default: npn)")
    g.add_argument("--gate-lr", type=float, default=S, help="Adam learning rate of gates and multipliers (0.05)")
    g.add_argument("--harden-at", type=float, default=S, help="harden the gates after this fraction of the run (0.8)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--batch-size", type=int, default=S, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=S)
    g.add_argument("--lr", type=float, default=S, help="peak learning rate")
    g.add_argument("--optimizer", default=S, help="sgd | adamw | adam")
    g.add_argument("--momentum", type=float, default=S)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S)
    g.add_argument("--weight-decay", type=float, default=S, help="on conv/linear weights only")
    g.add_argument("--label-smoothing", type=float, default=S)
    g.add_argument("--lr-schedule", default=S, help="cosine | linear | constant (stepped every optimizer step)")
    g.add_argument("--warmup-steps", type=int, default=S, help="linear LR warm-up steps")
    g.add_argument("--min-lr", type=float, default=S)
    g.add_argument("--grad-clip", type=float, default=S, help="clip the gradient norm to this value")
    g.add_argument("--temperature-start", type=float, default=S, help="dynamic-conv temperature at step 0 (30)")
    g.add_argument("--temperature-end", type=float, default=S, help="temperature after annealing (1)")
    g.add_argument("--temperature-epochs", type=float, default=S,
                   help="anneal linearly over this many epochs (3; at most half the run)")
    g.add_argument("--temperature-anneal-fraction", type=float, default=S,
                   help="anneal over this fraction of all steps instead (vision recipes: 0.1, as the paper)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=S, help="dataset location (fashion-mnist default: "
                                                  "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S, help="training augmentation")
    g.add_argument("--max-train-samples", type=int, default=S, help="train on a fixed random subset")
    g.add_argument("--max-test-samples", type=int, default=S, help="evaluate on a fixed random subset")
    g.add_argument("--num-workers", type=int, default=S, help="DataLoader worker processes (0)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--output-dir", default=S, help="run directory (default runs/<recipe>-<variant>-...)")
    g.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--nproc", type=int, default=S,
                   help="spawn N local processes (DistributedDataParallel; gloo on CPU, nccl on CUDA)")
    g.add_argument("--threads", type=int, default=S,
                   help="torch intra-op threads per process (default: torch's choice; split evenly with --nproc)")
    g.add_argument("--quiet", action="store_true", default=S, help="no progress bars or per-epoch lines")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of settings (flags override it; it overrides recipe defaults)")
    g.add_argument("--set", dest="set_values", action="append", type=_set_value, default=[], metavar="KEY=VALUE",
                   help="any setting or recipe option, e.g. --set crop_padding=4 (repeatable)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    g.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


NON_SETTINGS = {"func", "command", "config", "set_values", "resume", "overwrite", "list_recipes", "debug"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a recipe (static / dynamic / PAD) and write a run directory",
        description="Train a recipe's model as static, fully dynamic or PAD (partially dynamic). "
                    "Settings: recipe defaults < --config FILE < flags. See docs/training.md.",
    )
    add_train_args(p)
    p.set_defaults(func=run)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    flags = {k: v for k, v in vars(args).items() if k not in NON_SETTINGS}
    for key, value in args.set_values:
        if key in ("options", "pad_config"):
            raise ValueError(f"--set {key}=... is not supported; set its keys one by one")
        if key.startswith("pad_config."):
            flags.setdefault("pad_config", {})[key.split(".", 1)[1]] = value
        else:
            flags[key] = value
    return flags


def resolve_from_args(args: argparse.Namespace):
    from ..train import load_config_file, resolve_config, resume_config

    flags = explicit_settings(args)
    if args.resume:
        if "output_dir" not in flags and args.config is None:
            raise ValueError("--resume needs --output-dir DIR (the run to continue)")
        out = flags.pop("output_dir", None)
        if out is None:
            out = load_config_file(args.config).get("output_dir")
            if out is None:
                raise ValueError("--resume needs --output-dir DIR (the run to continue)")
        return resume_config(out, flags)
    file_values = load_config_file(args.config) if args.config else {}
    return resolve_config(flags, file_values)


def run(args: argparse.Namespace) -> int:
    from ..train import list_recipes, train
    from ..train.distributed import WorkerError
    from ..train.recipes import get_recipe

    if args.list_recipes:
        for name in list_recipes():
            print(f"{name:16s} {get_recipe(name).description}")
        return 0
    cfg = resolve_from_args(args)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except WorkerError as exc:
        if args.debug:
            raise
        print(f"padnet train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npadnet train: interrupted; continue with: padnet train --resume --output-dir {cfg.output_dir}",
              file=sys.stderr)
        return 130
    if cfg.quiet or not summary:  # quiet, or a non-zero torchrun rank
        return 0
    p = summary.get("params") or {}
    print(f"test accuracy {100 * summary['test_accuracy']:.2f}% (best {100 * summary['best_test_accuracy']:.2f}%), "
          f"deployable params {p.get('total', 0):,} (dynamic {p.get('dynamic', 0):,}); "
          f"summary: {cfg.output_dir}/summary.json")
    return 0
