"""Stage 1 of a partition: guard the model, and restore it afterwards.

:class:`PartitionGuard` is a context manager around the scoring loop. On entry
it snapshots what scoring may change and prepares the model: train/eval mode
(``train_mode``), ``requires_grad`` on exactly the leaves whose gradients the
criterion needs (the masks; the factors only when asked). With
``train_mode=True`` it also forks the RNG state (dropout) and snapshots every
buffer except the masks (BatchNorm running statistics).

On exit (normal or not) it restores train/eval flags, ``requires_grad``,
parameter ``.grad``, MoE ``aux_loss`` / ``last_expert_counts`` and the
snapshotted buffers and RNG; masks stop requiring grad. If the block raised,
the masks are restored too, so a failed partition changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .units import LayerPlan

__all__ = ["PartitionGuard", "unwrap"]

_AUX_ATTRS = ("aux_loss", "last_expert_counts")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers (any depth)."""
    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module  # our own all-reduce replaces DDP's gradient hooks
    return model


class PartitionGuard:
    """Prepare ``model`` for scoring and put everything but the masks back afterwards.

    Args:
        model: the (unwrapped) model.
        plans: its PAD layers (:class:`~.units.LayerPlan`).
        needs: the statistics to collect (``()`` for data-free criteria):
            ``mask_grad`` / ``dynamic_grad`` / ``static_grad`` make the masks /
            dynamic factors / static copies require grad while inside.
        train_mode: score in train mode (BatchNorm batch statistics, dropout).
    """

    def __init__(self, model: nn.Module, plans: list[LayerPlan], needs: tuple[str, ...], train_mode: bool) -> None:
        self.model = model
        self.plans = plans
        self.needs = tuple(needs)
        self.train_mode = bool(train_mode)
        self.saved_masks = {(p.name, g.name): g.mask.detach().clone() for p in plans for g in p.groups}
        self._training = [(m, m.training) for m in model.modules()]
        self._grads = [(p, p.grad) for p in model.parameters()]
        self._requires = [(p, p.requires_grad) for p in model.parameters()]
        self._aux: list[tuple[nn.Module, dict[str, Any]]] = [
            (m, {k: m.__dict__[k] for k in _AUX_ATTRS if k in m.__dict__})
            for m in model.modules() if "aux_loss" in m.__dict__
        ]
        self._buffers = None
        self._rng: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.train_mode:
            cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
            self._rng = torch.random.fork_rng(devices=cuda)
            mask_ids = {id(g.mask) for p in plans for g in p.groups}
            self._buffers = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in mask_ids]

    def __enter__(self) -> "PartitionGuard":
        self._rng.__enter__()
        try:
            self.model.train(self.train_mode)
            if self.needs:
                for p in self.plans:
                    for g in p.groups:
                        g.mask.requires_grad_("mask_grad" in self.needs)
                        if "dynamic_grad" in self.needs:
                            g.dynamic.requires_grad_(True)
                        if "static_grad" in self.needs:
                            g.static.requires_grad_(True)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._rng.__exit__(exc_type, exc, tb)
        finally:
            self.restore(masks=exc_type is not None)

    def restore(self, masks: bool) -> None:
        """Put back everything snapshotted; the masks too when ``masks`` (a failed call)."""
        for p in self.plans:
            for g in p.groups:
                g.mask.requires_grad_(False)
                if masks:
                    with torch.no_grad():
                        g.mask.copy_(self.saved_masks[(p.name, g.name)])
        for param, flag in self._requires:
            param.requires_grad_(flag)
        for param, grad in self._grads:
            param.grad = grad
        for module, flag in self._training:
            module.training = flag
        for module, state in self._aux:
            module.__dict__.update(state)
        if self._buffers is not None:
            with torch.no_grad():
                for b, v in self._buffers:
                    b.copy_(v)
