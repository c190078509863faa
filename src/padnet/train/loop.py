"""The generic training loop: ``train(cfg)`` runs one recipe end to end.

Variants: ``static`` trains the recipe's model as built; ``dynamic`` runs
:meth:`Recipe.dynamize` (every target layer fully dynamic); ``pad`` also
partitions the modes to ``cfg.ratio`` with :func:`padnet.transforms.partition.partition_`
before the first step (``partition_warmup_steps = 0``) or after that many
optimizer steps.

Per step: dynamic-conv temperature set (linear anneal), batch moved to the
device and transformed, ``loss_fn(outputs, targets)`` plus the recipe's
auxiliary loss, backward, optional gradient clipping, optimizer step, scheduler
step. Per epoch: test evaluation, one log line, ``metrics.jsonl`` rewritten,
checkpoint. At the end: ``model.safetensors``, plots, ``report.md`` and
finally ``summary.json`` (atomically; a run without it is not complete).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .._version import __version__
from ..transforms.counting import count_parameters
from ..layers.modes import pad_layers, temperature_layers
from ..transforms.diagnostics import mean_of, routing_diagnostics, routing_probe
from ..transforms.partition import get_criterion, partition_
from ..transforms.record import find_state
from ..layers.moe import update_expert_biases
from . import distributed as D
from .checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    load_checkpoint,
    load_model_bytes,
    mode_masks,
    model_bytes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RUNTIME_FIELDS, TrainConfig
from .outputs import (
    CONFIG,
    CURVES,
    LOG,
    METRICS,
    MODEL,
    MODES,
    REPORT,
    RUN_FILES,
    SUMMARY,
    fmt_int,
    fmt_pct,
    plot_curves,
    plot_modes,
    publish,
    read_json,
    render_report,
    write_json,
    write_jsonl,
    write_text,
)
from .recipes import DataBundle, Recipe, get_recipe

__all__ = ["train", "default_output_dir", "resume_config", "evaluate_model", "make_eval_loader", "subset"]


# ------------------------------------------------------------------ helpers


def default_output_dir(cfg: TrainConfig) -> str:
    tag = f"{cfg.recipe}-{cfg.variant}"
    if cfg.variant == "pad":
        tag += f"-r{cfg.ratio:g}"
    return str(Path("runs") / f"{tag}-seed{cfg.seed}")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def subset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """The first ``n`` items of a fixed seeded permutation (the same for every run seed)."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()  # type: ignore[arg-type]
    return Subset(ds, idx)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every item evaluated exactly once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def make_eval_loader(data: DataBundle, test: Dataset, batch_size: int, ctx: D.DistContext,
                     num_workers: int = 0) -> DataLoader:
    return DataLoader(test, batch_size=batch_size, sampler=ShardSampler(len(test), ctx.rank, ctx.world_size),
                      collate_fn=data.collate_fn, num_workers=num_workers,
                      pin_memory=ctx.device.type == "cuda")


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, recipe: Recipe, cfg: TrainConfig, loss_fn: Callable,
                   ctx: D.DistContext, transform: Callable | None, progress: bool = False) -> tuple[float, float, int]:
    """``(mean loss, accuracy, samples)`` over the loader, summed over ranks."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    try:
        for inputs, targets in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
            inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
            if transform is not None:
                inputs = transform(inputs)
            outputs = recipe.forward(model, inputs)
            n = int(targets.shape[0])
            loss_sum += float(loss_fn(outputs, targets)) * n
            c, k = recipe.accuracy_counts(outputs, targets)
            correct += c
            count += k
    finally:
        model.train(was_training)
    loss_sum, correct, count = D.all_reduce_sums(ctx, [loss_sum, correct, count])
    if count == 0:
        raise ValueError("the test set is empty")
    return loss_sum / count, correct / count, int(count)


def fully_dynamic_counts(model: nn.Module) -> dict[str, int]:
    """Deployable size of the same model with every mask all dynamic (kappa = 1)."""
    counts = count_parameters(model)
    dynamic = static = 0
    for _, layer in pad_layers(model):
        for g in layer.mode_groups():
            dynamic += g.mask.numel() * g.num_factors
    return {"static": static, "dynamic": dynamic, "router": counts.router, "other": counts.other,
            "total": static + dynamic + counts.router + counts.other}


def temperature_modules(model: nn.Module) -> list[nn.Module]:
    """The layers whose router temperature the trainer anneals (:func:`padnet.layers.modes.temperature_layers`)."""
    return [m for _, m in temperature_layers(model)]


def resume_config(output_dir: str | Path, explicit: dict[str, Any] | None = None) -> TrainConfig:
    """The saved configuration of a run, with runtime-only settings from ``explicit`` applied.

    Any other explicit setting that differs from the saved one raises ``ValueError``.
    """
    path = Path(output_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found (was the run started with this --output-dir?)")
    saved = TrainConfig.from_dict(read_json(path))
    from .config import field_names

    fields_ = set(field_names())
    for key, value in (explicit or {}).items():
        if key in RUNTIME_FIELDS:
            setattr(saved, key, value)
            continue
        if key == "pad_config":
            current = saved.pad_config
            value = {**saved.pad_config, **value}
        elif key in fields_:
            current = getattr(saved, key)
        elif key in saved.options:
            current = saved.options[key]
        else:
            raise ValueError(f"unknown setting {key!r}")
        if isinstance(current, tuple):
            value = tuple(value)
        if current != value:
            raise ValueError(f"cannot change {key} when resuming (run has {current!r}, got {value!r}); "
                             f"runtime settings that may change: {', '.join(RUNTIME_FIELDS)}")
    saved.output_dir = str(output_dir)
    return saved.validate()


class RunLog:
    """Log lines: stdout (unless quiet) and ``train.log`` (rank 0 only)."""

    def __init__(self, path: Path | None, quiet: bool, bars: bool, is_main: bool) -> None:
        self.path = path
        self.quiet = quiet
        self.bars = bars
        self.is_main = is_main

    def file(self, msg: str) -> None:
        """A line for ``train.log`` only (progress heartbeats of long epochs)."""
        if self.is_main and self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def __call__(self, msg: str, always: bool = False) -> None:
        if not self.is_main:
            return
        self.file(msg)
        if always or not self.quiet:
            if self.bars:
                from tqdm.auto import tqdm

                tqdm.write(msg)
            else:
                print(msg, flush=True)


# ----------------------------------------------------------------- the entry


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the summary dict.

    With ``cfg.nproc > 1`` (and not already under torchrun) spawns ``nproc``
    local processes; only rank 0 writes files.
    """
    cfg.validate()
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg)
    if not resume:
        resolve_paths(cfg)
    world = D.env_world_size()
    if cfg.nproc > 1 and world > 1 and world != cfg.nproc:
        raise ValueError(f"--nproc {cfg.nproc} disagrees with the torchrun world size {world}; "
                         "under torchrun leave --nproc out")
    if resume and D.env_rank() == 0:
        saved_world = _checkpoint_world_size(Path(cfg.output_dir))
        if saved_world is not None:
            world_size_rule(saved_world, world if world > 1 else cfg.nproc, cfg.output_dir)
    if cfg.nproc > 1 and world <= 1:
        recipe = get_recipe(cfg.recipe)
        recipe.validate(cfg)  # user errors (missing data) surface here, before spawning
        preflight(cfg, recipe, cfg.nproc)
        _check_run_dir(Path(cfg.output_dir), resume, overwrite, cfg)
        D.spawn(_spawned_main, (cfg.to_dict(), resume, overwrite), cfg.nproc)
        return read_json(Path(cfg.output_dir) / SUMMARY)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = D.setup(cfg.device)
    try:
        return Trainer(cfg, ctx, resume=resume, overwrite=overwrite).run()
    finally:
        D.teardown(ctx)


def _spawned_main(cfg_dict: dict[str, Any], resume: bool, overwrite: bool) -> None:
    cfg = TrainConfig.from_dict(cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = D.setup(cfg.device)
    try:
        # the parent already checked (and, with overwrite, will have cleaned) the directory
        Trainer(cfg, ctx, resume=resume, checked=True).run()
    finally:
        D.teardown(ctx)


def steps_per_epoch_for(num_train: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch of the training loader (same rule as :class:`Trainer`)."""
    per_rank = math.ceil(num_train / world_size)
    if per_rank >= batch_size:  # drop_last
        return per_rank // batch_size
    return 1 if per_rank else 0


def preflight(cfg: TrainConfig, recipe: Recipe, world_size: int) -> None:
    """Every check that can fail before training, run before the run directory is written.

    The data is built (recipes cache it for the run), ``pad_config`` is turned
    into a :class:`padnet.PadConfig` (types, ranges, target regexes), and the
    step counts are checked against ``warmup_steps`` / ``partition_warmup_steps``.
    """
    if cfg.is_dynamic:
        try:
            recipe.pad_config(cfg, None)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pad_config {cfg.pad_config!r}: {exc}") from None
    data = recipe.build_data(cfg)
    num_train = len(subset(data.train, cfg.max_train_samples))
    num_test = len(subset(data.test, cfg.max_test_samples))
    if num_train == 0 or num_test == 0:
        raise ValueError(f"empty training or test set ({num_train} train / {num_test} test samples)")
    total = steps_per_epoch_for(num_train, cfg.batch_size, world_size) * cfg.epochs
    if cfg.variant == "pad" and cfg.partition_warmup_steps >= total:
        raise ValueError(f"partition_warmup_steps={cfg.partition_warmup_steps} must be below the run's {total} "
                         f"optimizer steps ({cfg.epochs} epoch(s) of {num_train} samples, batch {cfg.batch_size} "
                         f"x {world_size} process(es))")
    if cfg.warmup_steps and cfg.warmup_steps >= total:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be below the run's {total} optimizer steps "
                         "(the learning rate would never reach its peak or decay)")


def world_size_rule(checkpoint_world: int, world: int, out: Path | str) -> None:
    """One rule for resuming: the same number of processes as the checkpoint, however they are started."""
    if int(checkpoint_world) != int(world):
        how = (f"padnet train --resume --output-dir {out} --nproc {checkpoint_world}  (or torchrun "
               f"--nproc-per-node {checkpoint_world} -m padnet train --resume --output-dir {out})"
               if checkpoint_world > 1 else f"padnet train --resume --output-dir {out} --nproc 1 (no torchrun)")
        raise ValueError(f"{out}: the checkpoint was written by {checkpoint_world} process(es) but this resume runs "
                         f"{world}; resume with the same number of processes: {how}")


def _checkpoint_world_size(out: Path) -> int | None:
    """World size recorded in the run's newest readable checkpoint (``None``: no checkpoint)."""
    ckpt = load_checkpoint(out)
    return None if ckpt is None else int(ckpt.get("world_size", 1))


def _check_run_dir(out: Path, resume: bool, overwrite: bool, cfg: TrainConfig) -> None:
    """Refuse to clobber another run; ``overwrite`` removes the files a run writes.

    A run that never wrote a checkpoint (it failed before the end of its first
    epoch: NaN loss at step 0, an error while building) has nothing to lose, so
    it is restarted without ``--overwrite``.
    """
    if resume:
        return
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if not existing:
        return
    never_checkpointed = not any((out / f).exists() for f in ("checkpoint.pt", "checkpoint.prev.pt", MODEL, SUMMARY))
    if overwrite or never_checkpointed:
        for f in existing:
            (out / f).unlink()
        return
    if (out / SUMMARY).exists():
        raise ValueError(f"{out} already holds a completed run (summary.json); choose another --output-dir "
                         "or pass --overwrite")
    raise ValueError(f"{out} holds an unfinished run ({', '.join(existing)}); continue it with --resume "
                     "or start over with --overwrite")


def run_record(cfg: TrainConfig, recipe: Recipe, data: DataBundle) -> dict[str, Any]:
    """What a saved model must carry to be used without its run: class names, input spec, settings.

    ``classes[i]`` names output index ``i``; ``input`` is :meth:`Recipe.input_spec`
    (image shape or sequence length); ``train_config`` is the full configuration
    (recipe, options, data paths), from which ``padnet predict`` rebuilds the
    preprocessing (normalisation, tokenizer).
    """
    try:
        spec = recipe.input_spec(cfg, data)
    except Exception as exc:  # informative only; never fail a finished run on it
        spec = {"kind": "unknown", "error": f"{type(exc).__name__}: {exc}"}
    return {"classes": recipe.class_names(cfg, data), "input": spec, "train_config": cfg.to_dict()}


def resolve_paths(cfg: TrainConfig) -> None:
    """Make the data paths absolute at the start of a run, so the saved config works from any directory."""
    if cfg.data_dir is not None:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    for key in ("train_file", "test_file", "model_path", "tokenizer"):
        value = cfg.options.get(key)
        if isinstance(value, str) and value not in ("auto", "hash") and Path(value).expanduser().exists():
            cfg.options[key] = str(Path(value).expanduser().resolve())


def _mask_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha1()
    for name, layer in pad_layers(model):
        for g in layer.mode_groups():
            h.update(name.encode())
            h.update(g.mask.detach().to("cpu", torch.uint8).numpy().tobytes())
            if g.live is not None:  # pruned entries (density < 1)
                h.update(g.live.detach().to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed run may have left (``.checkpoint.pt.*.tmp``, ...)."""
    prefixes = tuple("." + name for name in RUN_FILES) + (".model.",)
    for f in out.glob(".*.tmp"):
        if f.name.startswith(prefixes) and f.is_file():
            try:
                f.unlink()
            except OSError:  # pragma: no cover
                pass


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: D.DistContext, resume: bool = False, overwrite: bool = False,
                 checked: bool = False) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.resume = resume
        self.overwrite = overwrite
        self.checked = checked
        self.recipe = get_recipe(cfg.recipe)
        self.out = Path(cfg.output_dir)
        self.bars = ctx.is_main and not cfg.quiet and sys.stderr.isatty()
        self.notes: list[str] = []

    # ------------------------------------------------------------- set-up
    def run(self) -> dict[str, Any]:
        cfg, ctx, recipe = self.cfg, self.ctx, self.recipe
        if self.resume and (self.out / SUMMARY).exists():
            summary = read_json(self.out / SUMMARY)
            if ctx.is_main:
                print(f"{self.out} is already complete (summary.json); nothing to resume", flush=True)
            return summary
        recipe.validate(cfg)  # before writing anything
        preflight(cfg, recipe, ctx.world_size)
        if ctx.is_main and not self.checked:
            _check_run_dir(self.out, self.resume, self.overwrite, cfg)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.out)
            if not (self.resume and (self.out / CONFIG).exists()):
                write_json(self.out / CONFIG, cfg.to_dict())
        D.barrier(ctx)
        self.log = RunLog(self.out / LOG, cfg.quiet, self.bars, ctx.is_main)
        return self._run()

    def _build(self) -> None:
        cfg, ctx, recipe = self.cfg, self.ctx, self.recipe
        seed_all(cfg.seed)
        data = recipe.build_data(cfg)
        self.data = data
        self.train_set = subset(data.train, cfg.max_train_samples)
        self.test_set = subset(data.test, cfg.max_test_samples)
        if len(self.train_set) == 0 or len(self.test_set) == 0:
            raise ValueError("empty training or test set")
        model = recipe.build_model(cfg, data)
        self.params_static = count_parameters(model).to_dict()
        if cfg.is_dynamic:
            model = recipe.dynamize(cfg, model)
            if not any(True for _ in pad_layers(model)):
                raise ValueError(f"variant {cfg.variant!r}: the model has no PAD layers after dynamize")
        self.model = model.to(ctx.device)
        self.loss_fn = recipe.loss(cfg)
        self.train_tf = recipe.batch_transform(cfg, train=True)
        self.eval_tf = recipe.batch_transform(cfg, train=False)
        # loaders
        per_rank = math.ceil(len(self.train_set) / ctx.world_size)
        self.sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)
        self.train_loader = DataLoader(
            self.train_set, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=data.collate_fn,
            num_workers=cfg.num_workers, drop_last=per_rank >= cfg.batch_size,
            pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 256)
        self.test_loader = make_eval_loader(data, self.test_set, self.eval_bs, ctx, cfg.num_workers)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.variant == "pad" and cfg.partition == "imp" and cfg.partition_warmup_steps >= self.total_steps:
            raise ValueError(f"partition_warmup_steps={cfg.partition_warmup_steps} must be below the run's "
                             f"{self.total_steps} optimizer steps")
        self.gate_driver = None
        if cfg.variant == "pad" and cfg.partition == "gates":  # learned mode gates instead of IMP
            from .gating import GateDriver

            self.gate_driver = GateDriver(cfg, self.model, self.total_steps, self.log)
        self.optimizer = recipe.build_optimizer(cfg, self.model)
        if self.gate_driver is not None:
            self.gate_driver.attach_optimizer(self.optimizer)  # own param group, before the LR scheduler
        self.scheduler = recipe.build_scheduler(cfg, self.optimizer, self.total_steps)
        self.temp_modules = temperature_modules(self.model) if cfg.is_dynamic else []
        if cfg.temperature_anneal_fraction is not None:
            self.anneal_steps = int(round(cfg.temperature_anneal_fraction * self.total_steps))
        else:
            anneal_epochs = min(float(cfg.temperature_epochs), cfg.epochs / 2.0)
            self.anneal_steps = int(round(anneal_epochs * self.steps_per_epoch))
        from .mode_schedule import ModeScheduleHook, scheduler_enabled

        self.mode_hook = ModeScheduleHook(self) if scheduler_enabled(cfg) else None

    def temperature_at(self, step: int) -> float:
        cfg = self.cfg
        if self.anneal_steps <= 0:
            return float(cfg.temperature_end)
        frac = min(step / self.anneal_steps, 1.0)
        return float(cfg.temperature_start + (cfg.temperature_end - cfg.temperature_start) * frac)

    def set_temperature(self, step: int) -> float | None:
        if not self.temp_modules:
            return None
        t = self.temperature_at(step)
        for m in self.temp_modules:
            m.temperature = t
        return t

    # ---------------------------------------------------------- partition
    def partition(self) -> dict[str, Any]:
        """Partition the modes now (any step): function-preserving transitions, optimizer state of changed
        entries reset (the LR schedule is per step and unaffected); logs the loss on the partition batches
        before and after."""
        cfg = self.cfg
        batches = self._partition_batches()
        loss_before = self._batches_loss(batches)
        if not get_criterion(cfg.criterion).needs_data:  # data-free (magnitude, random, ...)
            self.log(f"partition: {cfg.criterion} (data-free), {cfg.partition_iterations} iteration(s), "
                     f"target kappa={cfg.ratio}, at step {self.global_step}")
            report = partition_(self.model, None, None, cfg.partition_config(), optimizer=self.optimizer)
            return self._finish_partition(report, loss_before, batches)
        self.log(f"partition: {cfg.criterion}, {cfg.partition_iterations} iteration(s), target kappa={cfg.ratio}, "
                 f"{len(batches)} batch(es) of {cfg.batch_size} per rank, at step {self.global_step}")
        report = partition_(self.model, batches, self.loss_fn, cfg.partition_config(), progress=self.bars,
                            optimizer=self.optimizer)
        return self._finish_partition(report, loss_before, batches)

    def _partition_batches(self) -> list:
        """The first ``partition_batches`` batches of a fixed shuffle (eval transform), the same count on every rank."""
        cfg, ctx = self.cfg, self.ctx
        sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed + 1)
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler,
                            collate_fn=self.data.collate_fn, num_workers=0,
                            generator=torch.Generator().manual_seed(cfg.seed + 1))
        batches = []
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
            if self.eval_tf is not None:
                inputs = self.eval_tf(inputs)
            batches.append((inputs, targets))
            if len(batches) >= cfg.partition_batches:
                break
        # every rank runs the same number of scoring passes (statistics are all-reduced)
        n = int(min(D.all_gather_objects(ctx, len(batches))))
        return batches[:n]

    @torch.no_grad()
    def _batches_loss(self, batches: list) -> float:
        """Mean loss over ``batches`` in the partition's train/eval mode; buffers and RNG left as they were."""
        cfg, ctx = self.cfg, self.ctx
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        cuda = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
        total = count = 0.0
        try:
            with torch.random.fork_rng(devices=cuda):
                model.train(bool(cfg.partition_train_mode))
                for inputs, targets in batches:
                    outputs = self.recipe.forward(model, inputs)
                    n = int(targets.shape[0])
                    total += float(self.loss_fn(outputs, targets)) * n
                    count += n
        finally:
            for m, flag in modes:
                m.training = flag
            for b, v in saved:
                b.copy_(v)
        total, count = D.all_reduce_sums(ctx, [total, count])
        return total / max(count, 1.0)

    def _finish_partition(self, report, loss_before: float | None = None, batches: list | None = None
                          ) -> dict[str, Any]:
        ctx = self.ctx
        digests = D.all_gather_objects(ctx, _mask_digest(self.model))
        self.masks_identical = len(set(digests)) == 1
        if not self.masks_identical:
            self.log(f"warning: ranks ended the partition with different masks ({len(set(digests))} variants); "
                     "using rank 0's", always=True)
        D.broadcast_state(ctx, self.model)  # identical masks and weights everywhere, to be safe
        d = report.to_dict()
        if loss_before is not None and batches is not None:
            d["loss_before"] = loss_before
            d["loss_after"] = self._batches_loss(batches)
            d["preserve"] = self.cfg.partition_preserve
        self.log(f"partition done: kappa={d['ratio']:.4f}, deployable params {fmt_int(d['size_before']['total'])} "
                 f"-> {fmt_int(d['size_after']['total'])} ({d['seconds']:.1f} s)"
                 + (f"; loss on the partition batches {d['loss_before']:.4f} -> {d['loss_after']:.4f} "
                    f"({'function-preserving transitions' if self.cfg.partition_preserve else 'masks only'}, "
                    f"{(d.get('transition') or {}).get('optimizer_entries_reset', 0):,} optimizer entries reset)"
                    if "loss_after" in d else ""))
        return d

    # -------------------------------------------------------------- resume
    def _restore(self, ckpt: dict[str, Any]) -> None:
        ctx = self.ctx
        world_size_rule(int(ckpt.get("world_size", 1)), ctx.world_size, self.out)
        if int(ckpt.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            raise ValueError(f"{ckpt['path']}: steps per epoch changed ({ckpt['steps_per_epoch']} -> "
                             f"{self.steps_per_epoch}); was the data or the batch size changed?")
        import tempfile

        if self.gate_driver is not None:
            self.gate_driver.prepare_restore(ckpt.get("gates") or {}, self.optimizer)
        load_model_bytes(self.model, ckpt["model"], Path(tempfile.gettempdir()), Path(ckpt["path"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.gate_driver is not None:
            self.gate_driver.load_state_dict(ckpt["gates"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best = float(ckpt.get("best_test_accuracy", -1.0))
        self.best_epoch = ckpt.get("best_epoch")
        self.metrics = list(ckpt.get("metrics", []))
        self.partition_report = ckpt.get("partition")
        self.partitioned = bool(ckpt.get("partitioned", False))
        self.partition_step = ckpt.get("partition_step")
        self.masks_identical = ckpt.get("partition_masks_identical")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        if self.mode_hook is not None:
            self.mode_hook.load_state_dict(ckpt.get("mode_scheduler"))
        rngs = ckpt["rng"]
        set_rng_state(rngs[ctx.rank] if isinstance(rngs, list) else rngs)
        self.log(f"resumed from {ckpt['path']} at epoch {self.start_epoch}/{self.cfg.epochs} "
                 f"(step {self.global_step})", always=True)

    def _checkpoint(self, temperature: float | None) -> None:
        rngs = D.all_gather_objects(self.ctx, rng_state())
        if not self.ctx.is_main:
            return
        state = {
            "epoch": self.epoch + 1,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "model": model_bytes(self.model, self.out),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "temperature": temperature,
            "masks": mode_masks(self.model),
            "best_test_accuracy": self.best,
            "best_epoch": self.best_epoch,
            "metrics": self.metrics,
            "partition": self.partition_report,
            "partitioned": self.partitioned,
            "partition_step": self.partition_step,
            "partition_masks_identical": self.masks_identical,
            "train_seconds": self.train_seconds,
            "config": self.cfg.to_dict(),
            "gates": None if self.gate_driver is None else self.gate_driver.state_dict(),
            "mode_scheduler": self.mode_hook.state_dict() if self.mode_hook is not None else None,
        }
        save_checkpoint(self.out, state)

    # ---------------------------------------------------------------- loop
    def _run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, ctx, recipe = self.cfg, self.ctx, self.recipe
        self._build()
        self.start_epoch = 0
        self.global_step = 0
        self.best = -1.0
        self.best_epoch = None
        self.metrics: list[dict[str, Any]] = []
        self.partition_report: dict[str, Any] | None = None
        self.partitioned = cfg.variant != "pad" or cfg.partition == "gates"
        self.partition_step: int | None = None
        self.masks_identical: bool | None = None
        self.train_seconds = 0.0
        ckpt = load_checkpoint(self.out) if self.resume else None
        if self.resume and ckpt is None:
            self.log(f"no checkpoint in {self.out} yet: starting the run from the beginning", always=True)
        self.log(f"padnet {__version__} train: recipe {cfg.recipe}, model {cfg.model} width {cfg.width}, variant "
                 f"{cfg.variant}{'' if cfg.ratio is None else f' kappa={cfg.ratio}'}, {cfg.epochs} epoch(s) x "
                 f"{self.steps_per_epoch} steps, batch {cfg.batch_size} x {ctx.world_size} process(es), "
                 f"{len(self.train_set)} train / {len(self.test_set)} test samples, device {ctx.device}")
        if self.gate_driver is not None:
            self.log(self.gate_driver.describe())
        if ckpt is not None:
            self._restore(ckpt)
        else:
            if not self.partitioned and cfg.partition_warmup_steps == 0:
                t0 = time.perf_counter()
                self.set_temperature(0)
                self.partition_report = self.partition()
                self.partitioned = True
                self.partition_step = 0
                self.train_seconds += time.perf_counter() - t0
            # per-rank randomness (augmentation, dropout) after the shared model set-up
            seed_all(cfg.seed + 7919 * ctx.rank)
        model = self.model
        if ctx.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                        find_unused_parameters=cfg.find_unused_parameters)
        temperature = self.set_temperature(self.global_step)
        epoch_bar = tqdm(total=cfg.epochs, initial=self.start_epoch, desc="epochs", disable=not self.bars,
                         dynamic_ncols=True, position=0)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                self.epoch = epoch
                t0 = time.perf_counter()
                self.sampler.set_epoch(epoch)
                train_loss, train_acc = self._train_epoch(model, epoch)
                temperature = self.set_temperature(self.global_step)
                D.broadcast_buffers(ctx, self.model)  # evaluate rank 0's BatchNorm statistics everywhere
                with routing_probe(self.model) as probe:
                    test_loss, test_acc, _ = evaluate_model(self.model, self.test_loader, recipe, cfg, self.loss_fn,
                                                            ctx, self.eval_tf, progress=self.bars)
                routing = routing_diagnostics(self.model, probe) if cfg.is_dynamic else {}
                del probe
                seconds = time.perf_counter() - t0
                self.train_seconds += seconds
                row = {
                    "epoch": epoch + 1,
                    "step": self.global_step,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "lr": float(self.scheduler.get_last_lr()[0]),
                    "temperature": temperature,
                    "seconds": seconds,
                }
                if routing:  # on this rank's share of the test set
                    row["routing_entropy"] = mean_of(routing, "entropy_normalized")
                    row["routing_std"] = mean_of(routing, "pi_std")
                    row["kernel_spread"] = mean_of(routing, "kernel_spread")
                    row["routing"] = {name: {k: v for k, v in r.items() if k != "pi_mean"}
                                      for name, r in routing.items()}
                if self.gate_driver is not None:
                    row.update(self.gate_driver.epoch_stats(self.model))
                if self.mode_hook is not None:
                    row.update(self.mode_hook.epoch_metrics())
                self.metrics.append(row)
                if test_acc > self.best:
                    self.best, self.best_epoch = test_acc, epoch + 1
                self.log(
                    f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f} acc {fmt_pct(train_acc)}  "
                    f"test loss {test_loss:.4f} acc {fmt_pct(test_acc)}  lr {row['lr']:.5f}"
                    + ("" if temperature is None else f"  T {temperature:.2f}")
                    + ("" if row.get("routing_std") is None else
                       f"  routing std {row['routing_std']:.3f} H {row['routing_entropy']:.3f}"
                       + ("" if row.get("kernel_spread") is None else f" spread {row['kernel_spread']:.3f}"))
                    + f"  {seconds:.1f} s"
                    + ("" if self.gate_driver is None else self.gate_driver.log_line(row))
                )
                if ctx.is_main:
                    write_jsonl(self.out / METRICS, self.metrics)
                self._checkpoint(temperature)
                D.barrier(ctx)
                epoch_bar.update(1)
        finally:
            epoch_bar.close()
        return self._finish()

    def _rewrap_after_hardening(self, model: nn.Module) -> nn.Module:
        """DDP cannot lose parameters: after the gates are hardened, wrap the model afresh."""
        if not self.ctx.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.rewrapped = DDP(self.model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                             find_unused_parameters=self.cfg.find_unused_parameters)
        return self.rewrapped

    def _train_epoch(self, model: nn.Module, epoch: int) -> tuple[float, float]:
        from tqdm.auto import tqdm

        cfg, ctx, recipe = self.cfg, self.ctx, self.recipe
        if getattr(self, "rewrapped", None) is not None:
            model = self.rewrapped
        model.train()
        loss_sum = correct = count = 0.0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not self.bars,
                   dynamic_ncols=True, position=1)
        heartbeat = max(1, self.steps_per_epoch // 10) if self.steps_per_epoch >= 50 else 0
        started = time.perf_counter()
        for i, (inputs, targets) in enumerate(bar, 1):
            if not self.partitioned and self.global_step >= cfg.partition_warmup_steps:
                t0 = time.perf_counter()
                self.partition_report = self.partition()
                self.partitioned = True
                self.partition_step = self.global_step
                self.notes.append(f"partitioned after {self.global_step} warm-up steps "
                                  f"({time.perf_counter() - t0:.1f} s, counted in that epoch's time)")
            self.set_temperature(self.global_step)
            if self.gate_driver is not None and self.gate_driver.before_step(self.global_step, self.optimizer):
                model = self._rewrap_after_hardening(model)  # the gate parameters left the model
            inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
            if self.train_tf is not None:
                inputs = self.train_tf(inputs)
            outputs = recipe.forward(model, inputs)
            loss = self.loss_fn(outputs, targets)
            aux = recipe.aux_loss(cfg, self.model)
            total = loss if aux is None else loss + aux
            gate_penalty = None if self.gate_driver is None else self.gate_driver.penalty()
            if gate_penalty is not None:
                total = total + gate_penalty
            if not torch.isfinite(total.detach()):
                if self.gate_driver is not None:
                    self.gate_driver.check_finite()  # names the layer whose gates went non-finite
                raise FloatingPointError(f"loss became {float(total)} at step {self.global_step} (epoch {epoch + 1}); "
                                         "lower --lr or enable grad_clip")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.gate_driver is not None:  # ARM: antithetic forward on the same batch
                self.gate_driver.after_backward(loss, lambda: self.loss_fn(recipe.forward(model, inputs), targets))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.gate_driver is not None:
                self.gate_driver.optimizer_step()
            self.scheduler.step()
            update_expert_biases(self.model)  # MoE aux-loss-free balancing (no-op without bias_balancing)
            self.global_step += 1
            if self.mode_hook is not None:
                self.mode_hook.step()
            n = int(targets.shape[0])
            loss_sum += float(loss.detach()) * n
            c, k = recipe.accuracy_counts(outputs, targets)
            correct += c
            count += k
            if self.bars:
                bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", acc=f"{correct / max(count, 1):.3f}")
            elif heartbeat and i % heartbeat == 0 and i < self.steps_per_epoch:
                self.log.file(f"  epoch {epoch + 1}: step {i}/{self.steps_per_epoch}, loss {loss_sum / count:.4f}, "
                              f"acc {correct / count:.4f}, {time.perf_counter() - started:.0f} s")
        bar.close()
        if self.gate_driver is not None and self.global_step >= self.gate_driver.harden_step:
            if self.gate_driver.before_step(self.global_step, self.optimizer):  # --harden-at 1: at the end
                self._rewrap_after_hardening(model)
        loss_sum, correct, count = D.all_reduce_sums(ctx, [loss_sum, correct, count])
        return loss_sum / max(count, 1), correct / max(count, 1)

    # -------------------------------------------------------------- finish
    def _finish(self) -> dict[str, Any]:
        from ..transforms.flops import count_flops
        from ..io.serialization import save

        cfg, ctx = self.cfg, self.ctx
        if not ctx.is_main:
            return {}
        model = self.model
        final = self.metrics[-1]
        files = [CONFIG, METRICS, MODEL, REPORT, CURVES, LOG, CHECKPOINT]
        if (self.out / PREVIOUS).exists():
            files.append(PREVIOUS)
        record = run_record(cfg, self.recipe, self.data)
        save(model, self.out / MODEL, extra={"recipe": cfg.recipe, "variant": cfg.variant, "ratio": cfg.ratio,
                                             "seed": cfg.seed, "test_accuracy": final["test_accuracy"], **record})
        publish(self.out / MODEL)
        try:
            example = to_device(self.recipe.example_input(cfg, self.data), ctx.device)
            flops = int(count_flops(model, example))
        except Exception as exc:  # FLOPs are informative; never fail a finished run on them
            flops = None
            self.notes.append(f"FLOPs not counted: {type(exc).__name__}: {exc}")
        layers = {name: layer.dynamic_ratio() for name, layer in pad_layers(model)}
        summary: dict[str, Any] = {
            "complete": True,
            "recipe": cfg.recipe,
            "variant": cfg.variant,
            "ratio": cfg.ratio,
            "seed": cfg.seed,
            "model": cfg.model,
            "width": cfg.width,
            "epochs": cfg.epochs,
            "world_size": ctx.world_size,
            "num_train_samples": len(self.train_set),
            "num_test_samples": len(self.test_set),
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "train_accuracy": final["train_accuracy"],
            "best_test_accuracy": self.best,
            "best_epoch": self.best_epoch,
            "params": count_parameters(model).to_dict(),
            "params_fully_dynamic": fully_dynamic_counts(model) if cfg.is_dynamic else None,
            "params_static": self.params_static,
            # the effective PadConfig (init, router_init, ...) the PAD layers were built with
            "pad_config": _dynamize_config(model) if cfg.is_dynamic else None,
            "flops": flops,
            "train_seconds": self.train_seconds,
            "dynamic_ratio": (sum(l.dynamic_ratio() * sum(g.mask.numel() for g in l.mode_groups())
                                  for _, l in pad_layers(model))
                              / max(sum(g.mask.numel() for _, l in pad_layers(model) for g in l.mode_groups()), 1)
                              if cfg.is_dynamic else None),
            "layer_dynamic_ratios": layers,
            "partition": self.partition_report,
            "partition_step": self.partition_step,
            "partition_masks_identical": self.masks_identical,
            "classes": record["classes"],
            "input": record["input"],
            "gates": None if self.gate_driver is None else self.gate_driver.summary(),
            "padnet_version": __version__,
            "device": str(ctx.device),
            "config": cfg.to_dict(),
        }
        title = f"{cfg.recipe} {cfg.model} w{cfg.width} {cfg.variant}"
        if cfg.ratio is not None:
            title += f" kappa={cfg.ratio}"
        try:
            plot_curves(self.out / CURVES, self.metrics, title)
            if layers:
                plot_modes(self.out / MODES, layers, title, summary["dynamic_ratio"])
                files.append(MODES)
            if self.gate_driver is not None and self.gate_driver.plot(self.out, title):
                files.append("gates.png")
            else:
                self.notes.append("static variant: no PAD layers, so no modes.png")
        except ImportError:
            files.remove(CURVES)
            self.notes.append("matplotlib is not installed: plots skipped (pip install matplotlib)")
        if self.mode_hook is not None:
            summary["mode_scheduler"] = self.mode_hook.finish(self.out, title)
            if "plot" in summary["mode_scheduler"]:
                files.append(summary["mode_scheduler"]["plot"])
        summary["files"] = sorted(files + [SUMMARY])
        summary["notes"] = list(self.notes)
        write_text(self.out / REPORT, render_report(summary, self.metrics, self.notes))
        write_json(self.out / SUMMARY, summary)  # last: marks the run complete
        p = summary["params"]
        self.log(f"done: test accuracy {fmt_pct(summary['test_accuracy'])} (best {fmt_pct(self.best)}), deployable "
                 f"params {fmt_int(p['total'])} (dynamic {fmt_int(p['dynamic'])}), {self.train_seconds:.1f} s; "
                 f"results in {self.out}", always=True)
        return summary


def _dynamize_config(model: nn.Module) -> dict[str, Any] | None:
    """The PadConfig (v2 dict) of the model's last ``dynamize`` step in its transform record."""
    state = find_state(model)
    step = state.last("dynamize") if state is not None else None
    return step.params["config"] if step is not None else None
