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

The options live in :class:`~.config.PartitionConfig`; the stages in their own
modules: :mod:`.guard` (snapshot / prepare / restore), :mod:`.statistics`
(collect), :mod:`.scoring` (score), :mod:`.selection` (schedule, threshold,
write masks) and :mod:`.report` (report rows and warnings). This module only
sequences them.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ...layers.modes import pad_layers
from .collective import Collective
from .config import SCOPES, PartitionConfig
from .criteria import Criterion, get_criterion
from .guard import PartitionGuard, unwrap
from .report import IterationRecord, PartitionReport, flagged_layers, layer_rows, uninformative_messages
from .schedules import get_schedule
from .scoring import is_symmetric, score_layers
from .selection import apply_selection
from .statistics import BatchSource, collect_statistics
from .units import LayerPlan
from ..counting import count_parameters
from ..record import find_state, get_state
from ..sparsity import prune_to_density_
from ..transitions import ModeTransition


__all__ = ["SCOPES", "SymmetricModesWarning", "partition_", "partition_record", "recorded_partition", "resolve_config"]


class SymmetricModesWarning(UserWarning):
    """Mode-partition scores carry no information for some layers.

    Raised (as a warning) when every dynamic factor of a layer equals its static
    copy with equal scales (symmetric modes: |dL/dM| is exactly zero, e.g. a
    model upcycled without noise) or when a criterion scores a whole layer zero.
    The mask of those entries is then decided by index order.
    """


class _Unset:
    def __repr__(self) -> str:
        return "<from config>"


UNSET: Any = _Unset()  # "not given": take the value from the PartitionConfig (or its default)


def resolve_config(config: PartitionConfig | None = None, **options: Any) -> PartitionConfig:
    """The validated :class:`PartitionConfig` of a call: ``config`` (default
    ``PartitionConfig()``) with every option that is not :data:`UNSET` replacing its field."""
    given = {k: v for k, v in options.items() if v is not UNSET}
    if config is None:
        return PartitionConfig(**given)
    if not isinstance(config, PartitionConfig):
        raise TypeError(f"config must be a PartitionConfig, got {type(config).__name__}")
    return config.replace(**given)


def partition_(
    model: nn.Module,
    batches: Iterable | None,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    ratio: float | PartitionConfig = UNSET,
    criterion: str | Criterion | Callable = UNSET,
    iterations: int = UNSET,
    schedule: str | Callable = UNSET,
    scope: str = UNSET,
    granularity: str = UNSET,
    num_batches: int | None = UNSET,
    *,
    config: PartitionConfig | None = None,
    warn_symmetric: bool = True,
    progress: bool = False,
    seed: int = UNSET,
    criterion_kwargs: dict[str, Any] | None = UNSET,
    monotone: bool | None = UNSET,
    train_mode: bool = UNSET,
    preserve: bool = UNSET,
    density: float | None = UNSET,
    density_distribution: str = UNSET,
    prune_criterion: str = UNSET,
    optimizer: torch.optim.Optimizer | None = None,
    process_group=None,
) -> PartitionReport:
    """Partition the modes of every PAD layer of ``model`` in place.

    The options come from a :class:`PartitionConfig` (``config=`` or in place of
    ``ratio``), each keyword option given replacing its field; options not
    given anywhere take the :class:`PartitionConfig` defaults.

    Args:
        model: a model with PAD layers (:func:`padnet.dynamize_`); DDP / DataParallel
            wrappers are unwrapped.
        batches: re-iterable of ``(inputs, targets)`` (a one-shot iterator is
            materialised once, its first ``num_batches``); ``inputs`` is a tensor
            (``model(x)``), a dict (``model(**x)``) or a tuple (``model(*x)``);
            moved to the masks' device. ``None`` for data-free criteria.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``; ``None`` for
            data-free criteria.
        ratio: target dynamic ratio kappa in (0, 1] (default 0.3), or a
            :class:`PartitionConfig`.
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
        config: a :class:`PartitionConfig` (the options above and below).
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
        preserve: apply the masks through function-preserving mode transitions
            (:mod:`padnet.transforms.transitions`): an entry that turns static
            gets ``W_s = (lambda_d / lambda_s) sum_k pbar_k W_k``, one that turns
            dynamic ``W_k = (lambda_s / lambda_d) W_s``. Every iteration is
            measured from the state the call started from. ``False``: masks only
            (the paper's partition at initialisation).
        density: fraction of entries that stay live (not pruned), in (0, 1]
            and >= ``ratio`` (both are fractions of all entries). ``None``
            (default) prunes nothing. Before scoring, every mode group keeps
            its best ``round(d_g * n_g)`` entries by ``prune_criterion``
            (``"magnitude"`` of the effective weights or seeded ``"random"``)
            with ``d_g`` from ``density_distribution`` (``"uniform"`` or
            ``"erk"``); pruned entries are zeroed and never become dynamic.
            Needs ``granularity="element"`` when below 1. See
            :mod:`padnet.transforms.sparsity`.
        density_distribution: ``"uniform"`` or ``"erk"`` (per-group densities).
        prune_criterion: ``"magnitude"`` or ``"random"`` (which entries stay live).
        optimizer: the training optimizer, when partitioning mid-training: the
            state (momentum, Adam moments) of entries that changed mode is reset.
        process_group: ``torch.distributed`` group (default: the world) whose
            statistics are summed so every rank ends with the same masks.

    Returns:
        :class:`PartitionReport` (``transition``: what the transitions changed).
        Train/eval flags, parameter ``.grad`` and ``requires_grad`` are as
        before the call; masks and, with ``preserve``, the factors of entries
        that changed mode are the only change (both restored if the call raises). The call is appended to the model's
        transform record (``padnet_state``) as a ``"partition"`` step.
    """
    started = time.perf_counter()
    if isinstance(ratio, PartitionConfig):
        if config is not None:
            raise TypeError("give the PartitionConfig once (as config= or in place of ratio), not both")
        config, ratio = ratio, UNSET
    cfg = resolve_config(
        config, ratio=ratio, criterion=criterion, iterations=iterations, schedule=schedule, scope=scope,
        granularity=granularity, num_batches=num_batches, seed=seed, criterion_kwargs=criterion_kwargs,
        monotone=monotone, train_mode=train_mode, preserve=preserve, density=density,
        density_distribution=density_distribution, prune_criterion=prune_criterion,
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"partition_ expects an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    crit = get_criterion(cfg.criterion)
    sched = get_schedule(cfg.schedule)
    layers = [(n, m) for n, m in pad_layers(model) if m.mode_groups()]
    if not layers:
        raise ValueError(
            "model has no PAD layers (DynamicConv2d / MoEFeedForward) to partition; run padnet.dynamize_ first"
        )
    data = _batch_source(crit, batches, loss_fn, cfg.num_batches)
    use_monotone = crit.monotone if cfg.monotone is None else bool(cfg.monotone)
    collective = Collective.of(process_group)

    size_before = count_parameters(model).to_dict()  # before pruning (density): the report shows its effect
    mode_snapshot = None
    if cfg.density is not None and cfg.density < 1.0:  # prune first (restored if the call fails)
        mode_snapshot = {(n, k): v.detach().clone() for n, m in layers for k, v in m.state_dict().items()}
        try:
            prune_to_density_(model, cfg.density, cfg.density_distribution, cfg.prune_criterion, seed=cfg.seed,
                              optimizer=optimizer)
        except BaseException:
            _restore_modes(layers, mode_snapshot)
            raise
    plans = [LayerPlan(n, m, cfg.granularity) for n, m in layers]
    device = plans[0].groups[0].mask.device
    total = sum(p.num_entries for p in plans)
    ratios_before = {p.name: p.layer.dynamic_ratio() for p in plans}
    start_global = sum(ratios_before[p.name] * p.num_entries for p in plans) / total
    symmetric = {p.name for p in plans if is_symmetric(p.layer)}
    zero_layers: set[str] = set()
    generator = torch.Generator().manual_seed(int(cfg.seed))
    history: list[IterationRecord] = []
    batches_used = 0

    transition = ModeTransition(model, preserve=cfg.preserve, optimizer=optimizer, record=False)  # in the partition step
    try:
        with PartitionGuard(model, plans, crit.needs if crit.needs_data else (), cfg.train_mode):
            for t in range(1, cfg.iterations + 1):
                stats: dict[tuple[str, str, str], Tensor] = {}
                if crit.needs_data:
                    stats, batches_used = collect_statistics(model, plans, data, loss_fn, crit.needs, device,
                                                             collective)
                scores, zeros = score_layers(crit, plans, stats, batches_used, t, generator, cfg.criterion_kwargs,
                                             symmetric)
                zero_layers |= zeros
                if collective.active and not crit.needs_data:  # random scores: rank 0's everywhere
                    flat = iter(collective.broadcast([s for p in plans for s in scores[p.name].values()]))
                    scores = {p.name: {g.name: next(flat) for g in p.groups} for p in plans}
                target_entries = apply_selection(plans, scores, cfg.scope, sched, t, cfg.iterations, cfg.ratio,
                                                 start_global, ratios_before, use_monotone, total,
                                                 write=transition.set_masks)
                kept = sum(int(g.mask.detach().sum()) for p in plans for g in p.groups)
                history.append(IterationRecord(t, target_entries / total, kept, kept / total))
                if progress:
                    print(
                        f"[padnet partition] iteration {t}/{cfg.iterations}: kept {kept:,}/{total:,} "
                        f"({kept / total:.4f}), {batches_used} batches, {time.perf_counter() - started:.1f} s",
                        file=sys.stderr,
                    )
            _check_pruned_stay_static(plans, cfg.ratio)
    except BaseException:
        transition.rollback()
        if mode_snapshot is not None:
            _restore_modes(layers, mode_snapshot)
        raise
    transition_report = transition.commit()

    flagged = flagged_layers([p.name for p in plans], symmetric, zero_layers, crit.stochastic)
    messages = uninformative_messages(flagged, symmetric, crit.name)
    if warn_symmetric:
        for msg in messages:
            warnings.warn(msg, SymmetricModesWarning, stacklevel=2)
    rows = layer_rows(plans, ratios_before, flagged)
    dynamic = sum(r.dynamic_entries for r in rows)
    report = PartitionReport(
        criterion=crit.name,
        schedule=cfg.schedule_name,
        scope=cfg.scope,
        granularity=cfg.granularity,
        iterations=cfg.iterations,
        target_ratio=cfg.ratio,
        ratio=dynamic / total,
        entries=total,
        dynamic_entries=dynamic,
        num_batches=batches_used,
        world_size=collective.world_size,
        seconds=time.perf_counter() - started,
        size_before=size_before,
        size_after=count_parameters(model).to_dict(),
        layers=rows,
        history=history,
        symmetric_layers=flagged,
        warnings=messages,
        transition=transition_report.to_dict(),
    )
    _record_partition(model, cfg, report)
    return report


def _check_pruned_stay_static(plans: list[LayerPlan], ratio: float) -> None:
    """Pruned entries are never dynamic (scores are -inf there; the counts must fit too)."""
    for p in plans:
        for g in p.groups:
            if g.live is not None and bool(((g.mask.detach() > 0.5) & (g.live.detach() < 0.5)).any()):
                raise ValueError(f"layer {p.name!r} group {g.name!r}: the target ratio needs more dynamic entries "
                                 f"than are live (ratio={ratio} vs the layer's density {p.layer.density():.4f}); "
                                 "lower ratio or raise density")


def _restore_modes(layers: list[tuple[str, nn.Module]], snapshot: dict[tuple[str, str], Tensor]) -> None:
    """Undo pruning of a failed call: weights and masks from the snapshot, live masks re-registered as saved."""
    with torch.no_grad():
        for name, layer in layers:
            state = {k: v for (n, k), v in snapshot.items() if n == name}
            for g in layer.mode_groups():
                if g.live is not None:
                    g.live.fill_(1.0)  # all live unless the snapshot (loaded next) had a live mask
            layer.load_state_dict(state, strict=False)


def _batch_source(crit: Criterion, batches: Iterable | None, loss_fn: Callable | None,
                  num_batches: int | None) -> BatchSource | None:
    """The batches of a data criterion (checked); ``None`` for a data-free one."""
    if not crit.needs_data:
        return None
    if batches is None:
        raise ValueError(
            f"criterion {crit.name!r} needs data: pass batches and loss_fn "
            f"(data-free criteria need neither: magnitude, random, set)"
        )
    if loss_fn is None or not callable(loss_fn):
        raise ValueError(f"criterion {crit.name!r} needs a callable loss_fn(outputs, targets), got {loss_fn!r}")
    return BatchSource(batches, num_batches)


def partition_record(cfg: PartitionConfig, report: PartitionReport) -> dict[str, Any]:
    """The ``"partition"`` step of the transform record: the options plus what was achieved.

    JSON-serialisable; the masks themselves live in the state_dict.
    """
    return {
        **cfg.to_dict(),
        "achieved_ratio": report.ratio,
        "dynamic_entries": report.dynamic_entries,
        "entries": report.entries,
        "layer_ratios": {row.name: row.ratio_after for row in report.layers},
        "transition": _transition_totals(report.transition),
    }


def _transition_totals(transition: dict[str, Any] | None) -> dict[str, Any] | None:
    """The totals of the partition's own mode transition (no per-layer rows): the record stays small."""
    if transition is None:
        return None
    return {k: transition[k] for k in ("preserve", "to_dynamic", "to_static") if k in transition}


def _record_partition(model: nn.Module, cfg: PartitionConfig, report: PartitionReport) -> None:
    """Append the call to ``model``'s transform record (``padnet.transforms.record``)."""
    get_state(model).append("partition", **partition_record(cfg, report))


def recorded_partition(model: nn.Module) -> dict[str, Any] | None:
    """The params of ``model``'s last ``"partition"`` step in its transform record, or ``None``."""
    state = find_state(model)
    step = state.last("partition") if state is not None else None
    return None if step is None else dict(step.params)
