"""``padnet partition``: mode partition (IMP) of a saved or zoo model.

    padnet partition MODEL_PATH --ratio 0.3 --dry-run --output pad.safetensors
    padnet partition --model resnet18 --small-input --width 0.5 --dry-run --report-json r.json

``MODEL_PATH`` is a file written by :func:`padnet.save`; ``--model`` builds a zoo
model and dynamizes it on the fly. Data criteria (``taylor`` ...) need batches:
:func:`data_source` provides them (``--dry-run``: random images and labels);
data-free criteria (``magnitude``, ``random``, ``set``) need none.

The partition options are a :class:`~padnet.transforms.partition.PartitionConfig`
built from the flags by :func:`partition_config` (its defaults and checks).
Without ``--ratio`` kappa is the one the model was last partitioned at (its
transform record), else ``PartitionConfig.ratio`` (0.3); never the file's
``PadConfig``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..io.serialization import load, save
from ..train.config import resolve_config
from ..train.recipes import get_recipe
from ..transforms.config import DynamicConvConfig, PadConfig
from ..transforms.dynamize import dynamize_
from ..transforms.partition import (
    GRANULARITIES,
    SCOPES,
    PartitionConfig,
    get_criterion,
    list_criteria,
    list_schedules,
    partition_,
)
from ..transforms.partition.partitioner import recorded_partition
from ..transforms.record import find_state
from .common import add_model_args, random_inputs, zoo_model

DEFAULTS = PartitionConfig()
DEFAULT_RATIO = DEFAULTS.ratio
# PartitionConfig field -> the flag that sets it (errors name the flag)
FLAG_OF = {"ratio": "--ratio", "criterion": "--criterion", "iterations": "--iterations", "schedule": "--schedule",
           "scope": "--scope", "granularity": "--granularity", "num_batches": "--batches", "seed": "--seed"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "partition",
        help="partition the modes of a PAD model (Iterative Mode Partition and other criteria)",
        description="Decide which entries of every PAD layer stay dynamic (PAD-Net IMP by default) and print "
                    "the report. Give a file written by padnet.save, or --model to build and dynamize a zoo model.",
    )
    p.add_argument("model_path", nargs="?", metavar="MODEL_PATH", help="model file written by padnet.save")
    add_model_args(p, default_model=None)
    p.add_argument("--num-kernels", type=int, default=4, help="K when dynamizing a zoo --model")
    p.add_argument("--ratio", type=float, default=None,
                   help=f"target dynamic ratio kappa in (0, 1] (default: the kappa the model was last partitioned "
                        f"at, else {DEFAULTS.ratio})")
    p.add_argument("--criterion", default=DEFAULTS.criterion, help=f"one of {', '.join(list_criteria())}")
    p.add_argument("--iterations", type=int, default=DEFAULTS.iterations, help="IMP iterations T")
    p.add_argument("--schedule", default=DEFAULTS.schedule, help=f"one of {', '.join(list_schedules())}")
    p.add_argument("--scope", default=DEFAULTS.scope, choices=SCOPES)
    p.add_argument("--granularity", default=DEFAULTS.granularity, choices=GRANULARITIES)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of random criteria, dry-run data and dynamize_")
    data = p.add_argument_group("data (for data criteria such as taylor)")
    data.add_argument("--recipe", default=None, help="take batches from this padnet train recipe's training data")
    data.add_argument("--data-dir", default=None, help="dataset location for --recipe")
    data.add_argument("--dry-run", action="store_true", help="random images and labels instead of a dataset")
    data.add_argument("--image-size", type=int, default=32, help="dry-run image size")
    data.add_argument("--batches", type=int, default=2, help="batches per iteration")
    data.add_argument("--batch-size", type=int, default=8, help="batch size (dry run and --recipe)")
    p.add_argument("--output", default=None, help="save the partitioned model here (padnet.save)")
    p.add_argument("--report-json", default=None, help="write the report as JSON here")
    p.add_argument("--progress", action="store_true", help="one line per iteration on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# model and data sources
# --------------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model to partition: ``padnet.load(MODEL_PATH)`` or a dynamized zoo ``--model``."""
    if args.model_path and args.model:
        raise ValueError("give either MODEL_PATH or --model, not both")
    if args.model_path:
        return load(args.model_path)
    if not args.model:
        raise ValueError("give a model: MODEL_PATH (a file written by padnet.save) or --model NAME (zoo)")
    model = zoo_model(args)
    dynamize_(model, PadConfig(conv=DynamicConvConfig(num_kernels=args.num_kernels), seed=args.seed))
    return model


def partition_config(args: argparse.Namespace, model: nn.Module | None = None) -> PartitionConfig:
    """The :class:`PartitionConfig` given by the flags (checked; errors name the flag).

    Without ``--ratio``: the ratio of ``model``'s last recorded partition when
    there is one, else the :class:`PartitionConfig` default.
    """
    options = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in FLAG_OF.items()}
    labels = dict(FLAG_OF)
    if options["ratio"] is None:
        options["ratio"] = DEFAULTS.ratio
        recorded = recorded_partition(model) if model is not None else None
        if recorded is not None and "ratio" in recorded:
            options["ratio"] = recorded["ratio"]
            labels["ratio"] = "the ratio recorded in the model's last partition"
    return PartitionConfig.from_options(options, labels=labels)


def model_in_chans(model: nn.Module, default: int) -> int:
    state = find_state(model)
    spec = (state.model_spec if state is not None else None) or {}
    return int(spec.get("kwargs", {}).get("in_chans", default))


def random_batches(model: nn.Module, in_chans: int, image_size: int, num_batches: int, batch_size: int,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` random ``(images, labels)`` pairs; labels cover the model's output classes."""
    if image_size < 1 or num_batches < 1 or batch_size < 1:
        raise ValueError(f"--image-size, --batches and --batch-size must be >= 1, got "
                         f"{image_size}, {num_batches}, {batch_size}")
    g = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    images = [random_inputs(model, batch_size, in_chans=in_chans, image_size=image_size, generator=g)
              for _ in range(num_batches)]  # token ids for text models
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x0 = images[0][:1]
        num_classes = model(x0.to(param) if x0.is_floating_point() else x0.to(param.device)).shape[-1]
    model.train(was_training)
    return [(x.to(param) if x.is_floating_point() else x.to(param.device),
             torch.randint(0, num_classes, (batch_size,), generator=g)) for x in images]


def data_source(args: argparse.Namespace, model: nn.Module) -> tuple[Iterable | None, Callable | None]:
    """``(batches, loss_fn)`` for the partition; ``(None, None)`` for data-free criteria.

    The one place that decides where data comes from, so a dataset / recipe
    source can be swapped in (``--dry-run``: random images and labels).
    """
    if not get_criterion(args.criterion).needs_data:
        return None, None
    if getattr(args, "recipe", None) is not None:
        return recipe_batches(args)
    if not args.dry_run:
        raise ValueError(
            f"criterion {args.criterion!r} needs data: pass --recipe NAME (a training recipe's data), "
            f"--dry-run (random images) or use a data-free "
            f"criterion (magnitude, random, set)"
        )
    in_chans = model_in_chans(model, args.in_chans)
    batches = random_batches(model, in_chans, args.image_size, args.batches, args.batch_size, args.seed)
    return batches, F.cross_entropy


def recipe_batches(args: argparse.Namespace) -> tuple[list, Callable]:
    """``args.batches`` seeded training batches of a ``padnet train`` recipe, with its loss."""
    settings = {"recipe": args.recipe}
    if args.data_dir is not None:
        settings["data_dir"] = args.data_dir
    cfg = resolve_config(settings)
    recipe = get_recipe(cfg.recipe)
    data = recipe.build_data(cfg)
    transform = recipe.batch_transform(cfg, train=False)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, collate_fn=data.collate_fn,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = []
    for inputs, targets in loader:
        batches.append((transform(inputs) if transform is not None else inputs, targets))
        if len(batches) == args.batches:
            break
    return batches, recipe.loss(cfg)


# --------------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    partition_config(args)  # validate the options before building the model
    model = load_model(args)
    cfg = partition_config(args, model)
    batches, loss_fn = data_source(args, model)
    report = partition_(model, batches, loss_fn, cfg, progress=args.progress)
    source = args.model_path or f"{args.model} (dynamized, K={args.num_kernels})"
    print(f"{source}: {'dry run, random data' if batches is not None else 'data-free criterion'}")
    print(report)
    if args.report_json:
        report.to_json(args.report_json)
        print(f"report written to {args.report_json}")
    if args.output:
        save(model, args.output, extra={"partition": _summary(report.to_dict())})
        print(f"partitioned model saved to {args.output}")
    sys.stdout.flush()
    return 0


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Report without per-layer rows, small enough for the file header."""
    keep = ("criterion", "schedule", "scope", "granularity", "iterations", "target_ratio", "ratio",
            "entries", "dynamic_entries", "num_batches", "size_before", "size_after")
    return {k: report[k] for k in keep}
