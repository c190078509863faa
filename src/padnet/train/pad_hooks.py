"""PAD-Net training hooks for any training loop (the Hugging Face ``Trainer`` callback in
:mod:`padnet.train.hf_callback` drives the same hooks).

What a PAD-Net run needs besides the task loss, in one place:

- the MoE auxiliary losses (balancing + router z-loss, already weighted per
  layer) added to the training loss;
- the auxiliary-loss-free expert-bias update after every optimizer step
  (layers with ``bias_balancing``);
- a linear temperature anneal of the dynamic-conv routers (modules with a
  ``temperature`` attribute) over the first steps;
- the mode partition (:func:`padnet.partition_`) at a chosen step;
- a :class:`padnet.ModeScheduler` (re-partition / prune-regrow) stepped after
  every optimizer step;
- learned mode gates (:class:`padnet.ModeGates`): sharpness schedule, budget
  penalty in the loss, their own Adam, hardening at a chosen step;
- per-step callables at each step end;
- logging: expert load (max/mean, cv), mean balance / z losses, expert bias
  size, and the dynamic ratio kappa of the PAD layers.

A plain loop calls ``step_begin`` / ``loss`` / (``optimizer_step`` with gates) /
``step_end`` / ``metrics``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..layers.modes import pad_layers, temperature_layers
from ..layers.moe import collect_aux_loss, summarize_expert_load, update_expert_biases

__all__ = ["PadTrainingHooks", "dynamic_ratio", "temperature_at"]


def dynamic_ratio(model: nn.Module) -> float | None:
    """Fraction of maskable entries that are dynamic over all PAD layers (kappa), ``None`` without PAD layers."""
    total = live = 0
    for _, layer in pad_layers(model):
        for g in layer.mode_groups():
            total += g.mask.numel()
            live += int(g.mask.detach().sum())
    return live / total if total else None


def temperature_at(step: int, start: float, end: float, steps: int) -> float:
    """Linear anneal from ``start`` (step 0) to ``end`` (step ``steps`` and after)."""
    if steps <= 0 or step >= steps:
        return float(end)
    return float(start) + (float(end) - float(start)) * step / steps


def _temperature_modules(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in temperature_layers(model)]


def _partition_function():
    from ..transforms.partition import partition_

    return partition_


class PadTrainingHooks:
    """PAD-Net bookkeeping for a training loop.

    Args:
        aux_loss: add the MoE auxiliary losses to the training loss (:meth:`loss`).
        bias_update: apply the expert-bias balancing step after each optimizer step.
        temperature: ``(start, end, steps)`` linear anneal of dynamic-conv
            temperatures, or ``None`` to leave them alone.
        partition_step: optimizer step after which the modes are partitioned
            (``None``: never).
        partition: ``fn(model) -> report`` run at ``partition_step``; default
            :func:`padnet.partition_` with ``partition_kwargs`` (``ratio`` and
            the other partition options) on ``partition_batches``.
        partition_kwargs: keyword arguments of :func:`padnet.partition_`
            (must include ``ratio`` when ``partition`` is not given).
        step_hooks: callables ``fn(model, step)`` run at every step end (after
            the bias update, the partition and the mode scheduler).
        mode_scheduler: a :class:`padnet.ModeScheduler` built on the model and
            its optimizer; ``scheduler.step()`` runs at every step end (its
            records are kept in ``mode_updates``; entries moved are logged).
        gates: :class:`padnet.ModeGates` attached to the model; the hooks set
            their sharpness at ``step / harden_step`` each step, add their budget
            penalty in :meth:`loss`, step their own Adam (``gate_lr``) in
            :meth:`optimizer_step` and harden them (function-preserving) at the
            beginning of step ``harden_step``. Call :meth:`attach_optimizer` with
            the model optimizer first (the gate parameters leave it).
        harden_step: optimizer step at which the gates are hardened (required with ``gates``).
        gate_lr: learning rate of the gates' Adam (default 0.05).

    Plain loop::

        hooks = PadTrainingHooks(temperature=(30.0, 1.0, 1000), partition_step=500,
                                 partition_kwargs={"ratio": 0.3, "batches": batches, "loss_fn": loss_fn})
        for step, (x, y) in enumerate(loader):
            hooks.step_begin(model, step)
            loss = hooks.loss(model, criterion(model(x), y))
            loss.backward(); opt.step(); opt.zero_grad()
            hooks.step_end(model, step + 1)
            if step % 50 == 0: print(hooks.metrics(model))

    With gates: ``hooks.attach_optimizer(opt)`` once, and ``hooks.optimizer_step()``
    right after ``opt.step()`` (before the gradients are zeroed).
    """

    def __init__(
        self,
        *,
        aux_loss: bool = True,
        bias_update: bool = True,
        temperature: tuple[float, float, int] | None = None,
        partition_step: int | None = None,
        partition: Callable[[nn.Module], Any] | None = None,
        partition_kwargs: dict[str, Any] | None = None,
        step_hooks: Sequence[Callable[[nn.Module, int], None]] = (),
        mode_scheduler: Any = None,
        gates: Any = None,
        harden_step: int | None = None,
        gate_lr: float = 0.05,
    ) -> None:
        if mode_scheduler is not None and not callable(getattr(mode_scheduler, "step", None)):
            raise TypeError(f"mode_scheduler must be a padnet.ModeScheduler, got {type(mode_scheduler).__name__}")
        if gates is not None:
            if not (callable(getattr(gates, "penalty", None)) and callable(getattr(gates, "harden_", None))):
                raise TypeError(f"gates must be padnet.ModeGates, got {type(gates).__name__}")
            if isinstance(harden_step, bool) or not isinstance(harden_step, int) or harden_step < 1:
                raise ValueError(f"gates need harden_step, an int >= 1 (the step at which they harden); "
                                 f"got {harden_step!r}")
            if not (isinstance(gate_lr, (int, float)) and math.isfinite(gate_lr) and gate_lr > 0):
                raise ValueError(f"gate_lr must be a finite number > 0, got {gate_lr!r}")
        elif harden_step is not None:
            raise ValueError("harden_step is given but gates is None")
        if temperature is not None:
            if len(temperature) != 3:
                raise ValueError(f"temperature must be (start, end, steps), got {temperature!r}")
            start, end, steps = temperature
            if not (float(start) > 0 and float(end) > 0) or int(steps) < 0:
                raise ValueError(f"temperature needs start > 0, end > 0, steps >= 0; got {temperature!r}")
            temperature = (float(start), float(end), int(steps))
        if partition_step is not None:
            if isinstance(partition_step, bool) or not isinstance(partition_step, int) or partition_step < 0:
                raise ValueError(f"partition_step must be an int >= 0, got {partition_step!r}")
            if partition is None and "ratio" not in (partition_kwargs or {}):
                raise ValueError("partition_step needs partition=fn(model) or partition_kwargs with a 'ratio'")
        for hook in step_hooks:
            if not callable(hook):
                raise TypeError(f"step_hooks must be callables fn(model, step), got {hook!r}")
        self.aux_loss = bool(aux_loss)
        self.bias_update = bool(bias_update)
        self.temperature = temperature
        self.partition_step = partition_step
        self.partition = partition
        self.partition_kwargs = dict(partition_kwargs or {})
        self.step_hooks = list(step_hooks)
        self.mode_scheduler = mode_scheduler
        self.mode_updates: list[dict[str, Any]] = []
        self._moved = 0
        self.gates = gates
        self.harden_step = harden_step
        self.gate_lr = float(gate_lr)
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self._model_optimizer: torch.optim.Optimizer | None = None
        self.harden_report: dict[str, Any] | None = None
        self.partition_report: Any = None
        self._sums: dict[str, float] = {}
        self._count = 0

    # -------------------------------------------------------------------- loop hooks

    @property
    def gates_active(self) -> bool:
        """Gates given and not yet hardened."""
        return self.gates is not None and self.harden_report is None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """With gates: their parameters leave ``optimizer`` and get their own Adam (``gate_lr``)."""
        if not self.gates_active:
            return
        self._model_optimizer = optimizer
        self.gates.remove_from_optimizer(optimizer)
        self.gate_optimizer = self.gates.build_optimizer(lr=self.gate_lr)

    def step_begin(self, model: nn.Module, step: int) -> None:
        """Set the annealed temperature for optimizer step ``step`` (0-based); with gates, their
        sharpness (or, at ``harden_step``, hardening)."""
        if self.temperature is not None:
            t = temperature_at(step, *self.temperature)
            for m in _temperature_modules(model):
                m.temperature = t
        if self.gates_active:
            if self.gate_optimizer is None:
                raise RuntimeError("PadTrainingHooks with gates: call attach_optimizer(model_optimizer) before "
                                   "training (the gate parameters need their own optimizer)")
            if step >= self.harden_step:
                self.harden_gates(step)
            else:
                self.gate_optimizer.zero_grad(set_to_none=True)
                self.gates.step(step / self.harden_step)

    def harden_gates(self, step: int) -> dict[str, Any]:
        """Harden the gates now (function-preserving masks at the target ratio); returns the report."""
        report = self.gates.harden_(self._model_optimizer)
        self.gate_optimizer = None
        self.harden_report = {"step": step, "ratio": report["ratio"], "transitions": report["transitions"]}
        return self.harden_report

    def loss(self, model: nn.Module, task_loss: Tensor) -> Tensor:
        """``task_loss`` plus the MoE auxiliary losses of the last forward (when enabled) and, with
        active gates, their budget penalty."""
        if self.aux_loss:
            task_loss = task_loss + collect_aux_loss(model).to(task_loss.device, task_loss.dtype)
        if self.gates_active:
            task_loss = task_loss + self.gates.penalty().to(task_loss.device, task_loss.dtype)
        return task_loss

    def optimizer_step(self) -> None:
        """With active gates: their Adam step (call right after the model optimizer's step)."""
        if self.gates_active and self.gate_optimizer is not None:
            self.gates.check_finite()
            self.gate_optimizer.step()

    def step_end(self, model: nn.Module, step: int, batches: Iterable | None = None) -> None:
        """After optimizer step ``step`` (1-based count of completed steps): bias update,
        statistics, the partition when ``step == partition_step``, then ``step_hooks``."""
        if self.bias_update:
            update_expert_biases(model)
        for key, value in summarize_expert_load(model).items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if self.partition_step is not None and step == self.partition_step and self.partition_report is None:
            self.partition_report = self.run_partition(model, batches)
        if self.mode_scheduler is not None:
            record = self.mode_scheduler.step()
            if record is not None:
                self.mode_updates.append(record)
                self._moved += int(record.get("entries_moved", 0))
        for hook in self.step_hooks:
            hook(model, step)

    def run_partition(self, model: nn.Module, batches: Iterable | None = None) -> Any:
        """Partition now (``partition`` or :func:`padnet.partition_` with ``partition_kwargs``)."""
        if self.partition is not None:
            return self.partition(model)
        kwargs = dict(self.partition_kwargs)
        if "batches" not in kwargs:
            kwargs["batches"] = batches
        was_training = model.training
        try:
            return _partition_function()(model, **kwargs)
        finally:
            model.train(was_training)

    def metrics(self, model: nn.Module, prefix: str = "padnet/") -> dict[str, float]:
        """Averages since the last call (expert load, aux losses, expert bias) plus the current kappa and
        temperature; resets the running averages."""
        out: dict[str, float] = {}
        if self._count:
            out.update({f"{prefix}{k}": v / self._count for k, v in self._sums.items()})
        self._sums, self._count = {}, 0
        kappa = dynamic_ratio(model)
        if kappa is not None:
            out[f"{prefix}dynamic_ratio"] = kappa
        if self.mode_scheduler is not None:
            out[f"{prefix}mode_entries_moved"] = float(self._moved)
            self._moved = 0
        if self.gates_active:
            st = self.gates.stats()
            out[f"{prefix}gate_expected_ratio"] = float(st["expected_ratio"])
            out[f"{prefix}gate_sharpness"] = float(st["sharpness"])
        temps = _temperature_modules(model)
        if temps:
            out[f"{prefix}temperature"] = float(temps[0].temperature)
        return out
