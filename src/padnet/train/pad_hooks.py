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
- per-step callables (e.g. a mode scheduler or gates) at each step end;
- logging: expert load (max/mean, cv), mean balance / z losses, expert bias
  size, and the dynamic ratio kappa of the PAD layers.

A plain loop calls ``step_begin`` / ``loss`` / ``step_end`` / ``metrics``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

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
            the bias update), e.g. a mode scheduler.

    Plain loop::

        hooks = PadTrainingHooks(temperature=(30.0, 1.0, 1000), partition_step=500,
                                 partition_kwargs={"ratio": 0.3, "batches": batches, "loss_fn": loss_fn})
        for step, (x, y) in enumerate(loader):
            hooks.step_begin(model, step)
            loss = hooks.loss(model, criterion(model(x), y))
            loss.backward(); opt.step(); opt.zero_grad()
            hooks.step_end(model, step + 1)
            if step % 50 == 0: print(hooks.metrics(model))
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
    ) -> None:
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
        self.partition_report: Any = None
        self._sums: dict[str, float] = {}
        self._count = 0

    # -------------------------------------------------------------------- loop hooks

    def step_begin(self, model: nn.Module, step: int) -> None:
        """Set the annealed temperature for optimizer step ``step`` (0-based)."""
        if self.temperature is not None:
            t = temperature_at(step, *self.temperature)
            for m in _temperature_modules(model):
                m.temperature = t

    def loss(self, model: nn.Module, task_loss: Tensor) -> Tensor:
        """``task_loss`` plus the MoE auxiliary losses of the last forward (when enabled)."""
        if not self.aux_loss:
            return task_loss
        return task_loss + collect_aux_loss(model).to(task_loss.device, task_loss.dtype)

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
        temps = _temperature_modules(model)
        if temps:
            out[f"{prefix}temperature"] = float(temps[0].temperature)
        return out
