"""``partition_``: Iterative Mode Partition (IMP) and friends, in place.

For ``t = 1..T`` the partitioner

1. collects the criterion's statistics over the batches under the current mask
   (data criteria only: one forward and one ``torch.autograd.grad`` per batch,
   summed; all-reduced under ``torch.distributed``),
2. scores every mask entry (higher = keep dynamic), aggregates the scores to
   decision units (granularity, mean),
3. keeps the best ``round(r_t * N)`` entries dynamic, ``r_t`` from the schedule
   (``kappa ** (t / T)`` by default; exactly ``kappa`` at ``t = T``), over all
   PAD layers together (``scope="global"``) or per layer (``scope="layer"``);
   everything else becomes static. Ties are broken by lower index (layer order
   of ``model.named_modules()``, then group order, then flat entry index).

Gradients are taken with ``torch.autograd.grad`` with respect to the masks (and,
when a criterion asks, the factors): parameter ``.grad`` fields are never
touched, non-PAD weights get no gradient work at all.
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import math
import sys
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..analysis.counting import count_parameters
from ..config import check_ratio
from ..layers.modes import pad_layers
from ..transforms.transitions import ModeTransition
from .criteria import Criterion, GroupStats, get_criterion
from .report import IterationRecord, LayerPartition, PartitionReport
from .schedules import get_schedule
from .units import GRANULARITIES, LayerPlan, round_half_up, select_top

__all__ = ["SCOPES", "SymmetricModesWarning", "partition_"]

SCOPES = ("global", "layer")


class SymmetricModesWarning(UserWarning):
    """Mode-partition scores carry no information for some layers.

    Raised (as a warning) when every dynamic factor of a layer equals its static
    copy with equal scales (symmetric modes: |dL/dM| is exactly zero, e.g. a
    model upcycled without noise) or when a criterion scores a whole layer zero.
    The mask of those entries is then decided by index order.
    """


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module  # our own all-reduce replaces DDP's gradient hooks
    return model


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _call(model: nn.Module, inputs: Any) -> Any:
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


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _dist_info(process_group) -> tuple[bool, int, int]:
    """``(active, world_size, src)`` where ``src`` is the global rank of the group's rank 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, 1, 0
    world = dist.get_world_size(process_group)
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    return world > 1, world, src


def _flat_reduce(tensors: list[Tensor], op: str, process_group, src: int) -> list[Tensor]:
    """All-reduce (sum) or broadcast a list of tensors as one flat buffer."""
    import torch.distributed as dist

    if not tensors:
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    if op == "sum":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    else:
        dist.broadcast(flat, src=src, group=process_group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start: start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _is_symmetric(layer: nn.Module) -> bool:
    """Every factor times lambda_d equals the static copy times lambda_s, exactly."""
    with torch.no_grad():
        lambda_s, lambda_d = layer.scales()
        same_scale = bool(lambda_s == lambda_d)
        for g in layer.mode_groups():
            if same_scale:  # cheap: a few entries first (noisy factors differ everywhere), then all
                head = min(64, g.static.numel())
                if not torch.equal(g.dynamic.reshape(g.num_factors, -1)[:, :head],
                                   g.static.reshape(1, -1)[:, :head].expand(g.num_factors, head)):
                    return False
                if not torch.equal(g.dynamic, g.static.unsqueeze(0).expand_as(g.dynamic)):
                    return False
            elif not torch.equal(lambda_d * g.dynamic, (lambda_s * g.static).unsqueeze(0).expand_as(g.dynamic)):
                return False
    return True


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


class _Data:
    """Batches for each iteration: re-iterates re-iterables, materialises one-shot iterators once."""

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


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def _collect(
    model: nn.Module,
    plans: list[LayerPlan],
    data: _Data,
    loss_fn: Callable,
    needs: tuple[str, ...],
    device: torch.device,
    dist_active: bool,
    process_group,
    src: int,
) -> tuple[dict[tuple[str, str, str], Tensor], int]:
    """Sum over batches of the requested gradients; returns ``({(layer, group, stat): sum}, batches)``."""
    leaves: list[Tensor] = []
    keys: list[tuple[str, str, str]] = []
    attr = {"mask_grad": "mask", "dynamic_grad": "dynamic", "static_grad": "static"}
    for p in plans:
        for g in p.groups:
            for stat in needs:
                leaves.append(getattr(g, attr[stat]))
                keys.append((p.name, g.name, stat))
    acc: list[Tensor | None] = [None] * len(leaves)
    count = 0
    with torch.enable_grad():
        for batch in data:
            inputs, targets = _split_batch(batch)
            inputs, targets = _to_device(inputs, device), _to_device(targets, device)
            loss = loss_fn(_call(model, inputs), targets)
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
    if dist_active:
        n = torch.tensor([float(count)], dtype=torch.float64, device=device)
        out = _flat_reduce(out + [n.to(out[0].dtype if out else torch.float64)], "sum", process_group, src)
        count = int(round(float(out.pop())))
    if count == 0:
        raise ValueError("batches yielded no data")
    return dict(zip(keys, out)), count


# --------------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------------


def partition_(
    model: nn.Module,
    batches: Iterable | None,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    ratio: float,
    criterion: str | Criterion | Callable = "taylor",
    iterations: int = 5,
    schedule: str | Callable = "exponential",
    scope: str = "global",
    granularity: str = "element",
    num_batches: int | None = None,
    *,
    warn_symmetric: bool = True,
    progress: bool = False,
    seed: int = 0,
    criterion_kwargs: dict[str, Any] | None = None,
    monotone: bool | None = None,
    train_mode: bool = False,
    process_group=None,
    preserve: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> PartitionReport:
    """Partition the modes of every PAD layer of ``model`` in place.

    Args:
        model: a model with PAD layers (:func:`padnet.dynamize_`); DDP / DataParallel
            wrappers are unwrapped.
        batches: re-iterable of ``(inputs, targets)`` (a one-shot iterator is
            materialised once, its first ``num_batches``); ``inputs`` is a tensor
            (``model(x)``), a dict (``model(**x)``) or a tuple (``model(*x)``);
            moved to the masks' device. ``None`` for data-free criteria.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``; ``None`` for
            data-free criteria.
        ratio: target dynamic ratio kappa in (0, 1].
        criterion: a registered name (:func:`list_criteria`), a
            :class:`Criterion` or a callable ``fn(group, stats, layer)``.
        iterations: T >= 1 scoring rounds.
        schedule: kept ratio per iteration (:func:`list_schedules`).
        scope: ``"global"`` (one threshold over all layers, exactly
            ``round(kappa * N_total)`` entries kept) or ``"layer"``
            (``round(kappa * N_layer)`` per layer).
        granularity: ``"element"``, ``"kernel"`` or ``"channel"`` (structured:
            exact to one unit's size).
        num_batches: use only the first ``num_batches`` batches per iteration.
        warn_symmetric: emit :class:`SymmetricModesWarning` for uninformative layers
            (they are recorded in the report either way).
        progress: print one line per iteration to stderr.
        seed: seed of the generator handed to criteria (``random``).
        criterion_kwargs: extra keyword arguments of the criterion (``gamma``, ``eps``).
        monotone: override the criterion's ranking rule (``True``: a static entry
            is never revived within the call).
        train_mode: collect statistics in train mode (BatchNorm batch statistics,
            dropout); buffers and RNG state are restored afterwards. Default: eval
            mode, no side effects.
        process_group: ``torch.distributed`` group (default: the world) whose
            statistics are summed so every rank ends with the same masks.
        preserve: apply the masks through function-preserving mode transitions
            (:mod:`padnet.transforms.transitions`): an entry that turns static
            gets ``W_s = (lambda_d / lambda_s) sum_k pbar_k W_k``, one that turns
            dynamic ``W_k = (lambda_s / lambda_d) W_s``. Every iteration is
            measured from the state the call started from. ``False``: masks only
            (the paper's partition at initialisation).
        optimizer: the training optimizer, when partitioning mid-training: the
            state (momentum, Adam moments) of entries that changed mode is reset.

    Returns:
        :class:`PartitionReport` (``transition``: what the transitions changed).
        Train/eval flags, parameter ``.grad`` and ``requires_grad`` are as
        before the call; masks and, with ``preserve``, the factors of entries
        that changed mode are the only change (both restored if the call raises).
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"partition_ expects an nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    kappa = check_ratio(ratio, "ratio")
    crit = get_criterion(criterion)
    sched = get_schedule(schedule)
    schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "custom")
    iterations = _check_int("iterations", iterations, 1)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if num_batches is not None:
        num_batches = _check_int("num_batches", num_batches, 1)
    layers = [(n, m) for n, m in pad_layers(model) if m.mode_groups()]
    if not layers:
        raise ValueError(
            "model has no PAD layers (DynamicConv2d / MoEFeedForward) to partition; run padnet.dynamize_ first"
        )
    data = None
    if crit.needs_data:
        if batches is None:
            raise ValueError(
                f"criterion {crit.name!r} needs data: pass batches and loss_fn "
                f"(data-free criteria need neither: magnitude, random, set)"
            )
        if loss_fn is None or not callable(loss_fn):
            raise ValueError(f"criterion {crit.name!r} needs a callable loss_fn(outputs, targets), got {loss_fn!r}")
        data = _Data(batches, num_batches)
    use_monotone = crit.monotone if monotone is None else bool(monotone)
    kwargs = dict(criterion_kwargs or {})
    dist_active, world_size, src = _dist_info(process_group)

    plans = [LayerPlan(n, m, granularity) for n, m in layers]
    device = plans[0].groups[0].mask.device
    total = sum(p.num_entries for p in plans)
    saved_masks = {(p.name, g.name): g.mask.detach().clone() for p in plans for g in p.groups}
    ratios_before = {p.name: p.layer.dynamic_ratio() for p in plans}
    start_global = sum(ratios_before[p.name] * p.num_entries for p in plans) / total
    size_before = count_parameters(model).to_dict()
    symmetric = {p.name for p in plans if _is_symmetric(p.layer)}
    zero_layers: set[str] = set()
    generator = torch.Generator().manual_seed(int(seed))
    transition = ModeTransition(model, preserve=preserve, optimizer=optimizer)

    # state to restore
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    aux_state = [(m, {k: m.__dict__[k] for k in ("aux_loss", "last_expert_counts") if k in m.__dict__})
                 for m in model.modules() if "aux_loss" in m.__dict__]
    buffers_snapshot = None
    history: list[IterationRecord] = []
    batches_used = 0
    ok = False
    rng = contextlib.nullcontext()
    if train_mode:
        cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
        rng = torch.random.fork_rng(devices=cuda)
        mask_ids = {id(g.mask) for p in plans for g in p.groups}
        buffers_snapshot = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in mask_ids]
    try:
        with rng:
            model.train(train_mode)
            if crit.needs_data:
                for p in plans:
                    for g in p.groups:
                        g.mask.requires_grad_("mask_grad" in crit.needs)
                        if "dynamic_grad" in crit.needs:
                            g.dynamic.requires_grad_(True)
                        if "static_grad" in crit.needs:
                            g.static.requires_grad_(True)
            for t in range(1, iterations + 1):
                stats: dict[tuple[str, str, str], Tensor] = {}
                if crit.needs_data:
                    stats, batches_used = _collect(model, plans, data, loss_fn, crit.needs, device, dist_active,
                                                   process_group, src)
                scores = _score(crit, plans, stats, batches_used, t, generator, kwargs, symmetric, zero_layers)
                if dist_active and not crit.needs_data:
                    flat = [s for p in plans for s in scores[p.name].values()]
                    flat = iter(_flat_reduce(flat, "broadcast", process_group, src))
                    scores = {p.name: {g.name: next(flat) for g in p.groups} for p in plans}
                target_entries = _apply(plans, scores, scope, sched, t, iterations, kappa, start_global,
                                        ratios_before, use_monotone, total, transition)
                kept = sum(int(g.mask.detach().sum()) for p in plans for g in p.groups)
                history.append(IterationRecord(t, target_entries / total, kept, kept / total))
                if progress:
                    print(
                        f"[padnet partition] iteration {t}/{iterations}: kept {kept:,}/{total:,} "
                        f"({kept / total:.4f}), {batches_used} batches, {time.perf_counter() - started:.1f} s",
                        file=sys.stderr,
                    )
        ok = True
    finally:
        transition_report = transition.commit() if ok else transition.rollback()
        for p in plans:
            for g in p.groups:
                g.mask.requires_grad_(False)
                if not ok:
                    with torch.no_grad():
                        g.mask.copy_(saved_masks[(p.name, g.name)])
        for param, flag in requires:
            param.requires_grad_(flag)
        for param, grad in grads:
            param.grad = grad
        for module, flag in training:
            module.training = flag
        for module, state in aux_state:
            module.__dict__.update(state)
        if buffers_snapshot is not None:
            with torch.no_grad():
                for b, v in buffers_snapshot:
                    b.copy_(v)

    flagged = sorted(symmetric | zero_layers, key=[p.name for p in plans].index)
    messages = []
    if crit.stochastic:
        flagged = sorted(symmetric, key=[p.name for p in plans].index)
    sym = [n for n in flagged if n in symmetric]
    zero = [n for n in flagged if n not in symmetric]
    if sym:
        messages.append(
            f"symmetric modes in {len(sym)} layer(s) {sym}: every dynamic factor equals the static copy "
            f"(lambda_d W_k == lambda_s W_s), so mode-flip scores are exactly zero and their mask is decided "
            f"by index order, not by importance. Break the symmetry before partitioning: dynamize_ with "
            f"PadConfig(noise_std > 0) (default 0.01) or train a short warm-up first."
        )
    if zero:
        messages.append(
            f"criterion {crit.name!r} scored every entry of {len(zero)} layer(s) {zero} exactly zero (does the "
            f"loss depend on them?); their mask is decided by index order."
        )
    if warn_symmetric:
        for msg in messages:
            warnings.warn(msg, SymmetricModesWarning, stacklevel=2)

    rows = []
    for p in plans:
        live = sum(int(g.mask.detach().sum()) for g in p.groups)
        rows.append(LayerPartition(
            name=p.name, type=type(p.layer).__name__, entries=p.num_entries,
            num_factors=p.groups[0].num_factors, ratio_before=ratios_before[p.name],
            ratio_after=live / p.num_entries, dynamic_entries=live, symmetric=p.name in flagged,
        ))
    dynamic = sum(r.dynamic_entries for r in rows)
    return PartitionReport(
        criterion=crit.name,
        schedule=schedule_name,
        scope=scope,
        granularity=granularity,
        iterations=iterations,
        target_ratio=kappa,
        ratio=dynamic / total,
        entries=total,
        dynamic_entries=dynamic,
        num_batches=batches_used,
        world_size=world_size,
        seconds=time.perf_counter() - started,
        size_before=size_before,
        size_after=count_parameters(model).to_dict(),
        layers=rows,
        history=history,
        symmetric_layers=flagged,
        warnings=messages,
        transition=transition_report.to_dict(),
    )


def _score(
    crit: Criterion,
    plans: list[LayerPlan],
    stats: dict[tuple[str, str, str], Tensor],
    num_batches: int,
    iteration: int,
    generator: torch.Generator,
    kwargs: dict[str, Any],
    symmetric: set[str],
    zero_layers: set[str],
) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for p in plans:
            lambda_s, lambda_d = (s.detach() for s in p.layer.scales())
            layer_scores = {}
            for g in p.groups:
                st = GroupStats(
                    layer_name=p.name, group_name=g.name, lambda_s=lambda_s, lambda_d=lambda_d,
                    mask_grad=stats.get((p.name, g.name, "mask_grad")),
                    dynamic_grad=stats.get((p.name, g.name, "dynamic_grad")),
                    static_grad=stats.get((p.name, g.name, "static_grad")),
                    num_batches=num_batches, iteration=iteration, generator=generator,
                )
                s = crit(g, st, p.layer, **kwargs)
                if not isinstance(s, Tensor) or tuple(s.shape) != tuple(g.shape):
                    got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                    raise ValueError(
                        f"criterion {crit.name!r} returned {got} for {p.name}:{g.name}; expected a tensor of "
                        f"shape {tuple(g.shape)}"
                    )
                s = s.detach()
                if not s.is_floating_point():
                    s = s.float()
                if p.name in symmetric and crit.symmetric_zero:
                    s = torch.zeros_like(s)
                layer_scores[g.name] = s
            if not crit.stochastic and all(not bool(s.any()) for s in layer_scores.values()):
                zero_layers.add(p.name)
            out[p.name] = layer_scores
    return out


def _apply(
    plans: list[LayerPlan],
    scores: dict[str, dict[str, Tensor]],
    scope: str,
    sched: Callable,
    t: int,
    T: int,
    kappa: float,
    start_global: float,
    ratios_before: dict[str, float],
    use_monotone: bool,
    total: int,
    transition: ModeTransition,
) -> float:
    """Select and write the masks of iteration ``t``; returns the scheduled number of entries (float)."""

    def scheduled(start: float) -> float:
        if t == T:
            return kappa
        r = float(sched(t, T, kappa, start))
        if not math.isfinite(r):
            raise ValueError(f"schedule returned {r} at iteration {t}/{T}")
        return min(max(r, 0.0), 1.0)

    dtype = torch.float32
    for layer_scores in scores.values():
        for s in layer_scores.values():
            dtype = torch.promote_types(dtype, s.dtype)
    device = plans[0].groups[0].mask.device
    units = [p.unit_scores(scores[p.name], dtype) for p in plans]
    lives = [p.unit_live() if use_monotone else None for p in plans]
    structured = any(sizes is not None for _, sizes in units)

    def sizes_of(i: int) -> Tensor | None:
        u, sizes = units[i]
        if not structured:
            return None
        return sizes.to(device) if sizes is not None else torch.ones(u.numel(), dtype=torch.long, device=device)

    if scope == "global":
        r = scheduled(start_global)
        target = round_half_up(r * total)
        flat = torch.cat([u.to(device) for u, _ in units])
        sizes = torch.cat([sizes_of(i) for i in range(len(plans))]) if structured else None
        live = torch.cat([lv.to(device) for lv in lives]) if use_monotone else None
        keep = select_top(flat, sizes, target, live)
        keeps, start = [], 0
        for u, _ in units:
            keeps.append(keep[start: start + u.numel()])
            start += u.numel()
        scheduled_entries = r * total
    else:
        keeps, scheduled_entries = [], 0.0
        for i, p in enumerate(plans):
            r = scheduled(ratios_before[p.name])
            target = round_half_up(r * p.num_entries)
            u = units[i][0].to(device)
            keeps.append(select_top(u, sizes_of(i), target, None if lives[i] is None else lives[i].to(device)))
            scheduled_entries += r * p.num_entries
    transition.set_masks({p.name: p.decode(keep.to(p.groups[0].mask.device)) for p, keep in zip(plans, keeps)})
    return scheduled_entries
