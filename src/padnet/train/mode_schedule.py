"""The trainer's side of :class:`~padnet.transforms.scheduler.ModeScheduler` (dynamic sparse training).

``padnet train --variant pad --repartition magnitude --growth gradient --update-interval 100 --density 0.8``
partitions to kappa and density (``partition_(..., density=)``) and then, during
training, re-partitions (dynamic <-> static) and, below density 1, prunes and
regrows (live <-> pruned). :class:`ModeScheduleHook` keeps all of it out of the
training loop: it builds the scheduler once the model is partitioned, steps it
after every optimizer step, hands each epoch its update records for
``metrics.jsonl``, saves/restores its state in checkpoints, and draws
``mask_churn.png`` at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

MASK_CHURN = "mask_churn.png"

__all__ = ["MASK_CHURN", "ModeScheduleHook", "plot_mask_churn", "scheduler_enabled", "prune_criterion_of"]


def prune_criterion_of(cfg) -> str | None:
    """The pruning criterion in effect: ``cfg.prune``; by default ``"magnitude"`` below density 1; ``None`` = off."""
    prune = cfg.prune
    if prune is None:
        return "magnitude" if cfg.density is not None and cfg.density < 1.0 and cfg.repartition is not None else None
    return None if str(prune).lower() == "none" else prune


def scheduler_enabled(cfg) -> bool:
    """Whether the run moves entries during training (``--repartition`` or ``--prune``)."""
    return cfg.variant == "pad" and (cfg.repartition is not None or prune_criterion_of(cfg) is not None)


class ModeScheduleHook:
    """Builds and drives the ModeScheduler of one training run (see module docstring)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.scheduler = None
        self.pending: list[dict[str, Any]] = []  # update records of the current epoch
        self.all_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ build
    def _probe_batches(self, step: int) -> list:
        """One deterministic training batch per probe (seeded by run seed, rank and step: resumable)."""
        t = self.trainer
        cfg = t.cfg
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7 * int(step) + 104_729 * t.ctx.rank)
        n = len(t.train_set)
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=g).tolist()
        items = [t.train_set[i] for i in idx]
        collate = t.data.collate_fn or torch.utils.data.default_collate
        inputs, targets = collate(items)
        from .loop import to_device

        inputs, targets = to_device(inputs, t.ctx.device), to_device(targets, t.ctx.device)
        if t.eval_tf is not None:
            inputs = t.eval_tf(inputs)
        return [(inputs, targets)]

    def build(self, start_step: int) -> None:
        from ..transforms.scheduler import ModeScheduler

        t = self.trainer
        cfg = t.cfg
        end_step = max(1, min(t.total_steps, int(cfg.mode_end * t.total_steps)))
        self.scheduler = ModeScheduler(
            t.model, t.optimizer, total_steps=t.total_steps, update_interval=cfg.update_interval,
            end_step=end_step, fraction=cfg.mode_fraction, repartition=cfg.repartition, growth=cfg.growth,
            prune=prune_criterion_of(cfg), regrow=cfg.regrow, scope=cfg.mode_scope, data=self._probe_batches,
            loss_fn=t.loss_fn, probe_batches=1, start_step=start_step, seed=cfg.seed,
        )
        t.log(f"mode scheduler: {self.scheduler!r}")

    # ------------------------------------------------------------------ loop
    def step(self) -> None:
        """Call after every optimizer step (``trainer.global_step`` already advanced)."""
        t = self.trainer
        if self.scheduler is None:
            if not t.partitioned:
                return
            self.build(start_step=t.global_step - 1)
        t0 = time.perf_counter()
        record = self.scheduler.step()
        if record is None:
            return
        record = dict(record, seconds=time.perf_counter() - t0)
        self.pending.append(record)
        self.all_records.append(record)
        layers = record["layers"]
        overlap = sum(v["dynamic_overlap"] for v in layers.values()) / max(len(layers), 1)
        t.log(f"  mode update at step {record['step']}: fraction {record['fraction']:.4f}, "
              f"{record['entries_moved']:,} entries moved, mean dynamic overlap {overlap:.3f}, "
              f"{record['seconds']:.2f} s")

    def epoch_metrics(self) -> dict[str, Any]:
        """``{"mode_updates": [...]}`` for the epoch's metrics row (records since the last call)."""
        out = {"mode_updates": self.pending}
        self.pending = []
        return out

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any] | None:
        if self.scheduler is None:
            return None
        return {"scheduler": self.scheduler.state_dict(), "records": list(self.all_records)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.build(start_step=int(state["scheduler"]["step_count"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.all_records = list(state.get("records", []))

    # ----------------------------------------------------------------- finish
    def finish(self, out: Path, title: str) -> dict[str, Any]:
        """Summary fields; writes ``mask_churn.png`` (returns its name under ``"plot"`` when written)."""
        seconds = self.scheduler.seconds if self.scheduler is not None else 0.0
        summary: dict[str, Any] = {"updates": len(self.all_records), "seconds": seconds,
                                   "entries_moved": sum(r["entries_moved"] for r in self.all_records)}
        if self.all_records:
            try:
                plot_mask_churn(out / MASK_CHURN, self.all_records, title)
                summary["plot"] = MASK_CHURN
            except ImportError:
                pass
        return summary


def plot_mask_churn(path: str | Path, records: list[dict[str, Any]], title: str) -> None:
    """Entries moved per update (by kind) and the dynamic-set overlap with the previous update, over steps."""
    from ..io.serialization import atomic_write
    from .outputs import _figure, publish

    steps = [r["step"] for r in records]
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for kind, style in (("pruned", "o-"), ("demoted", "s-")):
        ax1.plot(steps, [sum(v[kind] for v in r["layers"].values()) for r in records], style,
                 label={"pruned": "pruned = regrown", "demoted": "demoted = promoted"}[kind])
    ax1.set_xlabel("step")
    ax1.set_ylabel("entries moved per update")
    ax1.set_title("mask churn")
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = list(records[0]["layers"])
    for name in names:
        ax2.plot(steps, [r["layers"][name]["dynamic_overlap"] for r in records], ".-", label=name, alpha=0.7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("dynamic set overlap with previous")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("overlap per layer")
    if len(names) <= 12:
        ax2.legend(fontsize=6)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    publish(path)
