"""Stage 2 of a partition: collect a criterion's statistics over the batches.

For data criteria, one forward and one ``torch.autograd.grad`` per batch with
respect to the requested leaves of every mode group (``mask_grad`` ->
``group.mask``, ``dynamic_grad`` -> ``group.dynamic`` ``[K, *shape]``,
``static_grad`` -> ``group.static``), summed over the batches in at least
float32 and over the ranks of the :class:`~.collective.Collective`. Parameter
``.grad`` fields are never touched.
"""

from __future__ import annotations

import collections.abc
import itertools
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .collective import Collective
from .units import LayerPlan

__all__ = ["BatchSource", "StatKey", "call_model", "collect_statistics", "to_device"]

StatKey = tuple[str, str, str]  # (layer name, group name, statistic)
_LEAF_OF = {"mask_grad": "mask", "dynamic_grad": "dynamic", "static_grad": "static"}


class BatchSource:
    """Batches for each iteration: re-iterates re-iterables, materialises one-shot iterators once.

    ``num_batches`` (``None``: all) caps the batches used per iteration.
    """

    def __init__(self, batches: Iterable | None, num_batches: int | None) -> None:
        self.num_batches = num_batches
        self.cached: list | None = None
        self.source = batches
        if batches is None:
            return
        if not isinstance(batches, collections.abc.Iterable):
            raise TypeError(f"batches must be an iterable of (inputs, targets), got {type(batches).__name__}")
        if isinstance(batches, collections.abc.Iterator):
            self.cached = list(itertools.islice(batches, num_batches))

    def __iter__(self):
        if self.cached is not None:
            return iter(self.cached)
        return itertools.islice(iter(self.source), self.num_batches)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or dicts / lists / tuples of them) on ``device``."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a sequence, else ``model(inputs)``."""
    if isinstance(inputs, collections.abc.Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _reachable_leaves(root: Tensor) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad variables) in ``root``'s autograd graph."""
    seen_nodes: set[int] = set()
    leaves: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return leaves


def check_finite_loss(loss: Tensor, batch_index: int) -> None:
    """Scores from a NaN/inf loss would be NaN and pick arbitrary masks: refuse them."""
    value = loss.detach().reshape(())
    if not bool(torch.isfinite(value)):
        raise ValueError(
            f"partition_: the loss of scoring batch {batch_index} is {float(value)}; mode scores from a "
            "non-finite loss would be meaningless (check the data, the model's weights and the loss function)"
        )


def _check_masks_in_graph(loss: Tensor, plans: list[LayerPlan]) -> None:
    """Every PAD layer that contributes to the loss must multiply by its mask (modes.combine_factors).

    A forward fast path that skips the mask while ``mask.requires_grad`` is set
    would silently yield zero dL/dM; refuse instead.
    """
    reachable = _reachable_leaves(loss)
    for p in plans:
        for g in p.groups:
            used = id(g.dynamic) in reachable or id(g.static) in reachable
            if used and id(g.mask) not in reachable:
                raise RuntimeError(
                    f"{type(p.layer).__name__} {p.name!r} (mode group {g.name!r}) contributes to the loss but its "
                    f"forward does not multiply by its mode mask, so dL/dM cannot be computed. PAD layers must "
                    f"use modes.combine_factors (mask in the autograd graph) whenever the mask requires grad; "
                    f"a mask-specialised fast path has to fall back to it while mask.requires_grad is True."
                )


def collect_statistics(
    model: nn.Module,
    plans: list[LayerPlan],
    data: BatchSource,
    loss_fn: Callable,
    needs: tuple[str, ...],
    device: torch.device,
    collective: Collective,
) -> tuple[dict[StatKey, Tensor], int]:
    """Sum over batches (and ranks) of the requested gradients.

    Returns ``({(layer, group, stat): sum}, batches)``; a statistic whose leaf
    got no gradient is a zero tensor of the leaf's shape. The leaves must
    already require grad (:class:`~.guard.PartitionGuard` sets that).
    """
    leaves: list[Tensor] = []
    keys: list[StatKey] = []
    for p in plans:
        for g in p.groups:
            for stat in needs:
                leaves.append(getattr(g, _LEAF_OF[stat]))
                keys.append((p.name, g.name, stat))
    acc: list[Tensor | None] = [None] * len(leaves)
    count = 0
    with torch.enable_grad():
        for batch in data:
            inputs, targets = _split_batch(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            loss = loss_fn(call_model(model, inputs), targets)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"loss_fn must return a scalar tensor, got "
                    f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}"
                )
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not depend on the PAD layers' mode masks (did loss_fn or the model detach "
                    "the output, or run under torch.no_grad?)"
                )
            check_finite_loss(loss, count)
            if count == 0 and "mask_grad" in needs:
                _check_masks_in_graph(loss, plans)
            grads = torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
            for i, gr in enumerate(grads):
                if gr is None:
                    continue
                gr = gr.detach()
                if acc[i] is None:
                    acc[i] = gr.to(torch.promote_types(gr.dtype, torch.float32), copy=True)
                else:
                    acc[i].add_(gr)
            count += 1
            del loss, grads
    out = [a if a is not None else torch.zeros(leaf.shape, device=leaf.device,
                                               dtype=torch.promote_types(leaf.dtype, torch.float32))
           for a, leaf in zip(acc, leaves)]
    if collective.active:
        n = torch.tensor([float(count)], dtype=torch.float64, device=device)
        out = collective.sum(out + [n.to(out[0].dtype if out else torch.float64)])
        count = int(round(float(out.pop())))
    if count == 0:
        raise ValueError("batches yielded no data")
    return dict(zip(keys, out)), count
