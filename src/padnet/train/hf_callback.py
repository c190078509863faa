"""Hugging Face ``transformers.Trainer`` integration: :class:`PadNetCallback`.

The callback runs :class:`padnet.train.pad_hooks.PadTrainingHooks` (MoE
auxiliary losses, expert-bias balancing, temperature anneal, partition at a
step, per-step hooks, logging of expert load and kappa) inside ``Trainer``.
A callback cannot change the loss, so the auxiliary losses are added to
``outputs.loss`` by a forward hook on the model (training mode only). Attach
with :func:`add_padnet_callback` so its log entries also reach the reporting
integrations (which run before user callbacks).

Example::

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    add_padnet_callback(trainer, partition_step=200, partition_kwargs={"ratio": 0.3})
    trainer.train()
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("padnet.train.hf_callback needs Hugging Face transformers (and accelerate for "
                      "Trainer): `pip install 'padnet[hf]'`") from exc

from .pad_hooks import PadTrainingHooks

__all__ = ["PadNetCallback", "add_padnet_callback"]


def _add_aux_to_output(hooks: PadTrainingHooks):
    def hook(module: nn.Module, args, output):
        if not module.training:
            return output
        if isinstance(output, dict) and output.get("loss") is not None:  # ModelOutput is a dict
            output["loss"] = hooks.loss(module, output["loss"])
            return output
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor) and output[0].dim() == 0:
            return (hooks.loss(module, output[0]),) + tuple(output[1:])
        return output

    return hook


class _PartitionBatches:
    """The first ``n`` batches of the Trainer's training dataloader, as ``(inputs, None)`` pairs."""

    def __init__(self, loader, n: int, device) -> None:
        self.items = []
        for i, batch in enumerate(loader):
            if i >= n:
                break
            self.items.append(({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}, None))

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _hf_loss(outputs, _targets) -> Tensor:
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    if loss is None:
        raise ValueError("partition at step: the model returned no loss; pass labels in the batches "
                         "or give PadNetCallback(partition=fn(model))")
    return loss


class PadNetCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` running :class:`PadTrainingHooks` (same arguments).

    - auxiliary losses: a forward hook on the model adds them to ``outputs.loss``
      in training mode (models that compute their loss in ``forward`` from
      ``labels``; for a custom ``compute_loss`` add
      :func:`padnet.layers.moe.collect_aux_loss` there and pass
      ``aux_loss=False``);
    - temperature at each step begin, bias update / partition / step hooks at
      each step end (``state.global_step`` = completed optimizer steps);
    - the default partition (``partition_kwargs`` with a ``ratio``, no
      ``partition``) scores on the first ``partition_batches`` batches of the
      Trainer's training dataloader with the model's own loss;
    - ``mode_scheduler``: stepped at each step end; ``gates`` (with
      ``harden_step``): removed from the Trainer's optimizer at train begin,
      their penalty added to the loss by the same forward hook, their Adam
      stepped in ``on_optimizer_step``, hardened at ``harden_step``;
    - on each training log: :meth:`PadTrainingHooks.metrics` (``padnet/...``
      keys) are added to the log entry and to ``state.log_history``.

    ``callback.hooks`` is the hooks object; ``callback.hooks.partition_report``
    holds the partition report once it ran.
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
        partition_batches: int = 8,
        step_hooks: Sequence[Callable[[nn.Module, int], None]] = (),
        mode_scheduler: Any = None,
        gates: Any = None,
        harden_step: int | None = None,
        gate_lr: float = 0.05,
    ) -> None:
        if isinstance(partition_batches, bool) or not isinstance(partition_batches, int) or partition_batches < 1:
            raise ValueError(f"partition_batches must be an int >= 1, got {partition_batches!r}")
        if partition is None and partition_kwargs is not None:
            partition_kwargs = {"loss_fn": _hf_loss, **partition_kwargs}
        self.hooks = PadTrainingHooks(
            aux_loss=aux_loss, bias_update=bias_update, temperature=temperature, partition_step=partition_step,
            partition=partition, partition_kwargs=partition_kwargs, step_hooks=step_hooks,
            mode_scheduler=mode_scheduler, gates=gates, harden_step=harden_step, gate_lr=gate_lr,
        )
        self.partition_batches = partition_batches
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._handle is None and model is not None and (self.hooks.aux_loss or self.hooks.gates_active):
            self._handle = model.register_forward_hook(_add_aux_to_output(self.hooks))
        if self.hooks.gates_active and self.hooks.gate_optimizer is None:
            if optimizer is None:
                raise RuntimeError("PadNetCallback with gates: the Trainer passed no optimizer to on_train_begin")
            self.hooks.attach_optimizer(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.hooks.optimizer_step()  # gates: their Adam step while the gradients still exist

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.hooks.step_begin(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            return
        batches = None
        if (self.hooks.partition is None and self.hooks.partition_step == state.global_step
                and "batches" not in self.hooks.partition_kwargs and train_dataloader is not None):
            device = next(model.parameters()).device
            batches = _PartitionBatches(train_dataloader, self.partition_batches, device)
        self.hooks.step_end(model, state.global_step, batches)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None or not ("loss" in logs or "train_loss" in logs):
            return
        metrics = self.hooks.metrics(model)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def add_padnet_callback(trainer, **kwargs):
    """Create a :func:`PadNetCallback` and put it first in ``trainer``'s callbacks (so reporting
    integrations see its log entries); returns the callback."""
    if not hasattr(trainer, "callback_handler"):
        raise TypeError(f"add_padnet_callback expects a transformers.Trainer, got {type(trainer).__name__}")
    callback = PadNetCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
