"""``padnet evaluate RUN_DIR``: re-evaluate a run's saved model on its recipe's test set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="re-evaluate a training run's saved model on the recipe's test set",
        description="Load RUN_DIR/model.safetensors, evaluate it on the test set of the run's recipe, print the "
                    "accuracy and write RUN_DIR/evaluation.json.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `padnet train`")
    p.add_argument("--model-file", default=None, help="model file to evaluate (default RUN_DIR/model.safetensors)")
    p.add_argument("--data-dir", default=None, help="dataset location, if it moved since training")
    p.add_argument("--max-test-samples", type=int, default=None,
                   help="evaluate on a fixed subset (default: the run's own setting)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--no-write", action="store_true", help="do not write evaluation.json")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def evaluate_run(run_dir: str | Path, model_file: str | Path | None = None, data_dir: str | None = None,
                 max_test_samples: int | None = None, batch_size: int | None = None, device: str | None = None,
                 write: bool = True) -> dict:
    """Evaluate a run's model; returns ``{"test_accuracy", "test_loss", "num_test_samples", ...}``."""
    from ..train import TrainConfig, get_recipe
    from ..train import distributed as D
    from ..train.loop import evaluate_model, make_eval_loader, subset
    from ..train.outputs import CONFIG, EVALUATION, MODEL, read_json, write_json

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a padnet training run (no {CONFIG})")
    model_path = Path(model_file) if model_file else run_dir / MODEL
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found (the run is not complete; `padnet train --resume "
                                f"--output-dir {run_dir}` finishes it)")
    cfg = TrainConfig.from_dict(read_json(run_dir / CONFIG))
    if data_dir is not None:
        cfg.data_dir = data_dir
    if max_test_samples is not None:
        cfg.max_test_samples = max_test_samples
    recipe = get_recipe(cfg.recipe)
    ctx = D.DistContext(device=D.resolve_device(device or "auto"))
    data = recipe.build_data(cfg)
    test = subset(data.test, cfg.max_test_samples)
    model = recipe.load_model(cfg, data, model_path).to(ctx.device)
    loader = make_eval_loader(data, test, batch_size or cfg.eval_batch_size or max(cfg.batch_size, 256), ctx)
    t0 = time.perf_counter()
    loss, acc, n = evaluate_model(model, loader, recipe, cfg, recipe.loss(cfg), ctx,
                                  recipe.batch_transform(cfg, train=False))
    result = {"model_file": str(model_path), "test_accuracy": acc, "test_loss": loss, "num_test_samples": n,
              "seconds": time.perf_counter() - t0, "device": str(ctx.device)}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        result["summary_test_accuracy"] = read_json(summary_path).get("test_accuracy")
    if write:
        write_json(run_dir / EVALUATION, result)
    return result


def run(args: argparse.Namespace) -> int:
    r = evaluate_run(args.run_dir, args.model_file, args.data_dir, args.max_test_samples, args.batch_size,
                     args.device, write=not args.no_write)
    line = f"{args.run_dir}: test accuracy {100 * r['test_accuracy']:.2f}% on {r['num_test_samples']:,} samples " \
           f"(loss {r['test_loss']:.4f}, {r['seconds']:.1f} s)"
    if r.get("summary_test_accuracy") is not None:
        line += f"; at the end of training: {100 * r['summary_test_accuracy']:.2f}%"
    print(line)
    return 0
