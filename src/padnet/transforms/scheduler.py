"""``ModeScheduler``: dynamic sparse training over PAD modes (re-partition and prune/regrow during training).

Lifecycle (in the style of ``torch.ao.pruning`` schedulers)::

    sched = ModeScheduler(model, optimizer, total_steps=T, data=batches_for_step, loss_fn=F.cross_entropy)
    for step in range(T):
        loss = loss_fn(model(x), y); loss.backward()
        optimizer.step(); sched.step()          # after optimizer.step()
        optimizer.zero_grad()

Every ``update_interval`` steps until ``end_step`` (default 75 % of ``total_steps``)
the scheduler moves a fraction ``f_t = fraction * (1 + cos(pi t / end_step)) / 2``
of entries (cosine decay, as RigL and the seed paper):

1. **prune/regrow** (live <-> pruned, constant density; only with ``prune=``):
   the ``round(f_t * n_live)`` live entries with the lowest ``prune`` score are
   pruned (their values zeroed), and as many pruned entries (not the ones just
   pruned) with the highest ``regrow`` score become live with value 0; as many
   of them as dynamic entries were pruned become dynamic (highest scores first),
   the rest static, so the dynamic count is kept too.
2. **re-partition** (dynamic <-> static, constant kappa; with ``repartition=``):
   the ``round(f_t * n_dynamic)`` dynamic entries with the lowest
   ``repartition`` score are demoted to static and as many static entries with
   the highest ``growth`` score are promoted (entries moved in step 1 are left
   alone). These moves go through the function-preserving transitions
   (:func:`padnet.transforms.transitions.set_modes_`: ``W_s := lambda_d /
   lambda_s * sum_k pbar_k W_k`` on demotion with the layer's running mean
   routing weights ``pbar``, ``W_k := lambda_s / lambda_d * W_s`` on promotion).

Counts are exact per PAD layer (``scope="layer"``, default) or over the whole
model (``scope="global"``: layers may trade entries). Optimizer moments of
every moved entry are reset. Scores come from the criteria registry
(:mod:`padnet.transforms.partition.criteria`); entry criteria (prune/regrow) see each
group through :func:`padnet.transforms.sparsity.effective_view`.

Gradient statistics come from a *probe*: ``probe_batches`` batches of ``data``
(forward + ``torch.autograd.grad`` in eval mode; parameter ``.grad`` is never
touched), with live masks opened so pruned entries get their dense gradient
dL/dW_hat (their stored values are 0, so the function is unchanged). Under
``torch.distributed`` the statistics are summed over ranks and the decided
masks are broadcast from rank 0, so every rank holds identical masks.
"""

from __future__ import annotations

import collections.abc
import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..layers.modes import ModeGroup, is_compact_layer, pad_layers
from .sparsity import effective_grad, effective_view, effective_weight, round_half_up
from .record import get_state, register_op
from .transitions import reset_optimizer_state_, set_modes_

from .partition.criteria import Criterion, GroupStats, get_criterion, list_criteria
from .partition.statistics import call_model, to_device

__all__ = ["ModeScheduler", "SCHEDULER_SCOPES", "apply_mode_transitions"]

SCHEDULER_SCOPES = ("layer", "global")
register_op("mode_scheduler")  # provenance: its config, once per scheduler; the masks are in the state dict
_ALL_STATS = ("mask_grad", "dynamic_grad", "static_grad")
GroupKey = tuple[str, str]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model




def _dist(process_group) -> tuple[bool, int]:
    """``(active, src)``: whether torch.distributed runs with > 1 rank, and the group's rank-0 global rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) <= 1:
        return False, 0
    return True, (dist.get_global_rank(process_group, 0) if process_group is not None else 0)


def _flat(tensors: list[Tensor], op: str, process_group, src: int) -> list[Tensor]:
    """All-reduce (``"sum"``) or broadcast (``"broadcast"``) tensors as one buffer (float64; uint8 for masks)."""
    import torch.distributed as dist

    if not tensors:
        return tensors
    dtype = torch.uint8 if all(t.dtype == torch.bool for t in tensors) else torch.float64
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    if op == "sum":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    else:
        dist.broadcast(flat, src=src, group=process_group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def apply_mode_transitions(model: nn.Module, masks: dict[GroupKey, Tensor], optimizer, preserve: bool) -> None:
    """Change mode masks through the function-preserving transitions (:func:`padnet.transforms.transitions.set_modes_`).

    ``masks``: ``{(layer_name, group): new mode mask}``. Optimizer moments of
    the entries that changed mode are reset there.
    """
    if not masks:
        return
    spec: dict[str, dict[str, Tensor]] = {}
    for (name, group), mask in masks.items():
        spec.setdefault(name, {})[group] = mask
    # not one "transition" step per update: the scheduler's config step stands for them all (its history
    # holds the per-update counts, in its own state_dict)
    set_modes_(model, spec, preserve=preserve, optimizer=optimizer, record=False)


# --------------------------------------------------------------------------------------------
# the scheduler
# --------------------------------------------------------------------------------------------


class ModeScheduler:
    """Re-partition (dynamic <-> static) and prune/regrow (live <-> pruned) during training.

    Args:
        model: a model with PAD layers (DDP wrappers are unwrapped); not compact.
        optimizer: the training optimizer (moments of moved entries are reset), or ``None``.
        total_steps: optimizer steps of the whole run (needed unless ``end_step`` is given).
        update_interval: steps between updates (>= 1, default 100).
        end_step: last step with updates (default ``0.75 * total_steps``; at most ``total_steps``).
        fraction: initial moved fraction in (0, 1), cosine-decayed to 0 at ``end_step``.
        repartition: demotion criterion (lowest dynamic entries become static), a
            registered name or callable; ``None`` disables re-partition.
        growth: promotion criterion (highest static entries become dynamic);
            ``"gradient"`` is |dL/dM|, ``"momentum"`` its running average, ``"random"``.
        prune: entry pruning criterion (lowest live entries pruned) on the
            effective view; ``None`` (default) disables prune/regrow.
        regrow: regrowth criterion (highest pruned entries regrown): ``"gradient"``
            (dense |dL/dW_hat|, RigL), ``"momentum"`` (its running average, SNFS), ``"random"``.
        scope: ``"layer"`` (exact counts per PAD layer) or ``"global"`` (reallocation).
        data: batches for the gradient probe: a re-iterable of ``(inputs, targets)``
            (cycled) or a callable ``data(step) -> iterable`` (deterministic, resumable).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` for the probe.
        probe_batches: batches per probe (>= 1).
        running_average: ``beta`` in (0, 1) to score every gradient criterion on
            running averages of the statistics (``momentum`` uses 0.9 unless given).
        stats_interval: also probe every this many steps to feed the running
            averages (default: only at updates).
        preserve: function-preserving mode transitions (default ``True``).
        start_step: initial value of the step counter (e.g. the global step when
            the scheduler is created after a warm-up).
        seed: seed of the generator for random criteria (state is saved).
        criterion_kwargs: extra keyword arguments for every criterion (``gamma``, ``eps``).
        process_group: ``torch.distributed`` group (default: the world).

    ``history`` holds one record per update (see :meth:`step`); ``state_dict()`` /
    ``load_state_dict()`` make a resumed run bit-exact (masks and weights live in the
    model's own state_dict). Creating a scheduler appends one ``"mode_scheduler"`` step
    (:meth:`config`) to the model's transform record; its updates add no steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int | None = None,
        update_interval: int = 100,
        end_step: int | None = None,
        fraction: float = 0.3,
        repartition: str | Criterion | Callable | None = "magnitude",
        growth: str | Criterion | Callable = "gradient",
        prune: str | Criterion | Callable | None = None,
        regrow: str | Criterion | Callable = "gradient",
        scope: str = "layer",
        data: Iterable | Callable[[int], Iterable] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        probe_batches: int = 1,
        running_average: float | None = None,
        stats_interval: int | None = None,
        preserve: bool = True,
        start_step: int = 0,
        seed: int = 0,
        criterion_kwargs: dict[str, Any] | None = None,
        process_group=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModeScheduler expects an nn.Module, got {type(model).__name__}")
        model = _unwrap(model)
        if any(is_compact_layer(m) for m in model.modules()):
            raise ValueError("ModeScheduler: the model is compact (deploy form); masks can no longer change. "
                             "Schedule the training form and call compact_ after training")
        self.layers = [(n, m) for n, m in pad_layers(model) if m.mode_groups()]
        if not self.layers:
            raise ValueError("ModeScheduler: the model has no PAD layers; run padnet.dynamize_ first")
        self.model = model
        self._slots = []  # (parent, attribute, layer): a cheap per-step check that no layer was swapped
        for name, layer in self.layers:
            parent_name, _, child = name.rpartition(".")
            self._slots.append((model.get_submodule(parent_name) if parent_name else model, child, layer))
        self.optimizer = optimizer
        self.update_interval = _check_int(update_interval, "update_interval", 1)
        if total_steps is not None:
            total_steps = _check_int(total_steps, "total_steps", 1)
        if end_step is None:
            if total_steps is None:
                raise ValueError("ModeScheduler needs total_steps (or an explicit end_step)")
            end_step = max(1, int(0.75 * total_steps))
        end_step = _check_int(end_step, "end_step", 1)
        if total_steps is not None and end_step > total_steps:
            raise ValueError(f"end_step={end_step} is beyond training (total_steps={total_steps})")
        self.total_steps = total_steps
        self.end_step = end_step
        self.fraction = _check_fraction(fraction, "fraction")
        if scope not in SCHEDULER_SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCHEDULER_SCOPES}")
        self.scope = scope
        self.repartition = None if repartition is None else get_criterion(repartition)
        self.growth = get_criterion(growth)
        self.prune = None if prune is None else get_criterion(prune)
        self.regrow = get_criterion(regrow)
        if self.repartition is None and self.prune is None:
            raise ValueError("ModeScheduler: nothing to do (repartition=None and prune=None)")
        if self.prune is not None and not any(layer.has_pruned() for _, layer in self.layers):
            raise ValueError("prune/regrow needs pruned entries: partition with density < 1 first "
                             "(partition_(..., density=0.5)), or pass prune=None")
        if running_average is not None:
            running_average = _check_fraction(running_average, "running_average")
        self.running_average = running_average
        if stats_interval is not None:
            stats_interval = _check_int(stats_interval, "stats_interval", 1)
        self.stats_interval = stats_interval
        self.probe_batches = _check_int(probe_batches, "probe_batches", 1)
        self.step_count = _check_int(start_step, "start_step", 0)
        if self.needs_data:
            if data is None or loss_fn is None or not callable(loss_fn):
                names = [c.name for c in self._criteria() if c.needs_data]
                raise ValueError(f"criteria {names} need gradient statistics: pass data= (batches or a callable "
                                 f"step -> batches) and loss_fn=")
            if not callable(data) and not isinstance(data, collections.abc.Iterable):
                raise TypeError(f"data must be an iterable of (inputs, targets) or a callable, got "
                                f"{type(data).__name__}")
        self.data = data
        self.loss_fn = loss_fn
        self.preserve = bool(preserve)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.criterion_kwargs = dict(criterion_kwargs or {})
        self.process_group = process_group
        self.history: list[dict[str, Any]] = []
        self.running: dict[str, Tensor] = {}
        self._data_iter = None
        self.seconds = 0.0
        get_state(model).append("mode_scheduler", **self.config())

    def config(self) -> dict[str, Any]:
        """The schedule's options (JSON; criteria by name): the ``"mode_scheduler"`` step of the record."""
        def name(crit: Criterion | None) -> str | None:
            return None if crit is None else crit.name

        return {
            "total_steps": self.total_steps, "update_interval": self.update_interval, "end_step": self.end_step,
            "fraction": self.fraction, "repartition": name(self.repartition),
            "growth": name(self.growth) if self.repartition is not None else None,
            "prune": name(self.prune), "regrow": name(self.regrow) if self.prune is not None else None,
            "scope": self.scope, "running_average": self.running_average, "stats_interval": self.stats_interval,
            "probe_batches": self.probe_batches, "preserve": self.preserve, "start_step": self.step_count,
            "seed": self.seed, "layers": len(self.layers),
        }

    # ---- configuration ---------------------------------------------------------------------
    @staticmethod
    def known_criteria() -> list[str]:
        """Names usable for ``repartition``, ``growth``, ``prune`` and ``regrow`` (the criteria registry)."""
        return list_criteria()

    def _criteria(self) -> list[Criterion]:
        crits = []
        if self.repartition is not None:
            crits += [self.repartition, self.growth]
        if self.prune is not None:
            crits += [self.prune, self.regrow]
        return crits

    @property
    def needs_data(self) -> bool:
        return any(c.needs_data for c in self._criteria())

    def _beta(self, crit: Criterion) -> float | None:
        beta = getattr(crit.fn, "running_beta", None)
        return self.running_average if self.running_average is not None else beta

    def fraction_at(self, step: int) -> float:
        """Scheduled fraction at ``step``: ``fraction * (1 + cos(pi step / end_step)) / 2``, 0 from end_step on."""
        if step >= self.end_step:
            return 0.0
        return self.fraction * 0.5 * (1.0 + math.cos(math.pi * step / self.end_step))

    # ---- lifecycle ---------------------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Advance one training step; at update steps move entries and return the update's record."""
        if any(child and parent._modules.get(child) is not layer for parent, child, layer in self._slots):
            raise RuntimeError("ModeScheduler.step(): the model was compacted or its PAD layers were replaced "
                               "(compact_, re-dynamize); masks can no longer change: create a new scheduler "
                               "on the training form")
        self.step_count += 1
        t = self.step_count
        is_update = t % self.update_interval == 0 and t < self.end_step
        wants_stats = self.stats_interval is not None and t % self.stats_interval == 0 and t < self.end_step
        if not (is_update or wants_stats):
            return None
        started = time.perf_counter()
        stats = self._probe(t) if self.needs_data else {}
        record = self._update(t, stats) if is_update else None
        self.seconds += time.perf_counter() - started
        return record

    # ---- statistics --------------------------------------------------------------------------
    def _batches(self, step: int) -> list:
        if callable(self.data) and not isinstance(self.data, collections.abc.Iterable):
            return list(self.data(step))[: self.probe_batches]
        out = []
        for _ in range(2):
            if self._data_iter is None:
                self._data_iter = iter(self.data)
            for batch in self._data_iter:
                out.append(batch)
                if len(out) >= self.probe_batches:
                    return out
            self._data_iter = None  # cycle
        if not out:
            raise ValueError("ModeScheduler: data yielded no batches")
        return out

    def _probe(self, step: int) -> dict[tuple[str, str, str], Tensor]:
        """Summed gradient statistics over the probe batches; running averages updated."""
        groups = [(n, layer, g) for n, layer in self.layers for g in layer.mode_groups()]
        leaves, keys = [], []
        for n, _, g in groups:
            for stat, t in (("mask_grad", g.mask), ("dynamic_grad", g.dynamic), ("static_grad", g.static)):
                leaves.append(t)
                keys.append((n, g.name, stat))
        device = groups[0][2].mask.device
        training = [(m, m.training) for m in self.model.modules()]
        requires = [(t, t.requires_grad) for t in leaves]
        lives = [(g.live, g.live.detach().clone()) for _, _, g in groups if g.live is not None]
        aux = [(m, {k: m.__dict__[k] for k in ("aux_loss", "last_expert_counts") if k in m.__dict__})
               for m in self.model.modules() if "aux_loss" in m.__dict__]
        acc: list[Tensor | None] = [None] * len(leaves)
        try:
            self.model.eval()
            with torch.no_grad():
                for _, _, g in groups:  # pruned values are 0 (invariant), so opening the live masks is exact
                    if g.live is not None:
                        dead = g.live < 0.5
                        if bool(dead.any()):
                            g.static.data[dead] = 0
                            g.dynamic.data[:, dead] = 0
                        g.live.fill_(1.0)
            for t in leaves:
                t.requires_grad_(True)
            with torch.enable_grad():
                for batch in self._batches(step):
                    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
                        raise ValueError("ModeScheduler: each batch must be an (inputs, targets) pair")
                    inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
                    loss = self.loss_fn(call_model(self.model, inputs), targets)
                    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                        raise ValueError("ModeScheduler: loss_fn must return a scalar tensor that depends on the "
                                         "model")
                    grads = torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
                    for i, gr in enumerate(grads):
                        if gr is None:
                            continue
                        gr = gr.detach().to(torch.promote_types(gr.dtype, torch.float32))
                        acc[i] = gr.clone() if acc[i] is None else acc[i].add_(gr)
        finally:
            with torch.no_grad():
                for live, saved in lives:
                    live.copy_(saved)
            for t, flag in requires:
                t.requires_grad_(flag)
            for m, flag in training:
                m.training = flag
            for m, state in aux:
                m.__dict__.update(state)
        out = [a if a is not None else torch.zeros(t.shape, device=t.device,
                                                   dtype=torch.promote_types(t.dtype, torch.float32))
               for a, t in zip(acc, leaves)]
        active, src = _dist(self.process_group)
        if active:
            out = _flat(out, "sum", self.process_group, src)
        stats = dict(zip(keys, out))
        # running averages (per statistic), used by criteria with running_beta or running_average=
        betas = {self._beta(c) for c in self._criteria() if c.needs_data} - {None}
        for beta in betas:
            for key, value in stats.items():
                name = f"{beta}|{key[0]}|{key[1]}|{key[2]}"
                old = self.running.get(name)
                self.running[name] = value.clone() if old is None else old.mul_(beta).add_(value, alpha=1 - beta)
        return stats

    def _stats_for(self, crit: Criterion, stats: dict, key: tuple[str, str, str]) -> Tensor | None:
        beta = self._beta(crit)
        if beta is None:
            return stats.get(key)
        return self.running.get(f"{beta}|{key[0]}|{key[1]}|{key[2]}")

    # ---- scoring -----------------------------------------------------------------------------
    def _score(self, crit: Criterion, view: ModeGroup, gs: GroupStats, layer: nn.Module, where: str) -> Tensor:
        s = crit(view, gs, layer, **self.criterion_kwargs)
        if not isinstance(s, Tensor) or tuple(s.shape) != tuple(view.shape):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"criterion {crit.name!r} returned {got} for {where}; expected a tensor of shape "
                             f"{tuple(view.shape)}")
        s = s.detach()
        if not s.is_floating_point():
            s = s.float()
        if bool(torch.isnan(s).any()):
            raise ValueError(f"criterion {crit.name!r} returned NaN scores for {where}; nothing was changed")
        return s.reshape(-1).to(torch.float64)

    def _group_scores(self, stats: dict) -> dict[GroupKey, dict[str, Tensor]]:
        """All scores (flat float64) of every group, computed before anything changes."""
        out: dict[GroupKey, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name, layer in self.layers:
                lambda_s, lambda_d = (s.detach() for s in layer.scales())
                one = torch.ones((), dtype=torch.float32, device=lambda_s.device)
                for g in layer.mode_groups():
                    where = f"layer {name!r} group {g.name!r}"
                    scores: dict[str, Tensor] = {}

                    def real_stats(crit: Criterion) -> GroupStats:
                        return GroupStats(
                            layer_name=name, group_name=g.name, lambda_s=lambda_s, lambda_d=lambda_d,
                            mask_grad=self._stats_for(crit, stats, (name, g.name, "mask_grad")),
                            dynamic_grad=self._stats_for(crit, stats, (name, g.name, "dynamic_grad")),
                            static_grad=self._stats_for(crit, stats, (name, g.name, "static_grad")),
                            num_batches=self.probe_batches, iteration=len(self.history) + 1,
                            generator=self.generator)

                    w = effective_weight(g, lambda_s, lambda_d)

                    def entry_stats(crit: Criterion) -> tuple[ModeGroup, GroupStats]:
                        rs = real_stats(crit)
                        grad = effective_grad(g, lambda_s, lambda_d, rs.dynamic_grad, rs.static_grad)
                        removal = None
                        if rs.dynamic_grad is not None and rs.static_grad is not None:
                            mask = g.mask.detach().to(w.dtype)
                            removal = (mask * (g.dynamic.detach().to(w.dtype) * rs.dynamic_grad.to(w.dtype)).sum(0)
                                       + (1 - mask) * g.static.detach().to(w.dtype) * rs.static_grad.to(w.dtype))
                        view = effective_view(g, w, grad)
                        return view, GroupStats(
                            layer_name=name, group_name=g.name, lambda_s=one, lambda_d=one, mask_grad=removal,
                            dynamic_grad=None if grad is None else grad.unsqueeze(0),
                            static_grad=None if grad is None else torch.zeros_like(grad),
                            num_batches=rs.num_batches, iteration=rs.iteration, generator=self.generator)

                    if self.prune is not None:
                        view, es = entry_stats(self.prune)
                        scores["prune"] = self._score(self.prune, view, es, layer, where + " (prune)")
                        view, es = entry_stats(self.regrow)
                        scores["regrow"] = self._score(self.regrow, view, es, layer, where + " (regrow)")
                    if self.repartition is not None:
                        scores["demote"] = self._score(self.repartition, g, real_stats(self.repartition), layer,
                                                       where + " (repartition)")
                        rs = real_stats(self.growth)
                        promo = ModeGroup(g.name, w.unsqueeze(0), torch.zeros_like(w), g.mask, g.channel_dim,
                                          g.kernel_dims, g.live)
                        ps = GroupStats(
                            layer_name=name, group_name=g.name, lambda_s=one, lambda_d=one, mask_grad=rs.mask_grad,
                            dynamic_grad=None if rs.mask_grad is None else rs.mask_grad.unsqueeze(0),
                            static_grad=None, num_batches=rs.num_batches, iteration=rs.iteration,
                            generator=self.generator)
                        scores["promote"] = self._score(self.growth, promo, ps, layer, where + " (growth)")
                    out[(name, g.name)] = scores
        return out

    # ---- decisions ---------------------------------------------------------------------------
    @staticmethod
    def _pick(scores: Tensor, candidates: Tensor, n: int, lowest: bool) -> Tensor:
        """Bool mask of the ``n`` candidates with the lowest (or highest) score; ties: lower index.

        Linear time: the n-th smallest key (``kthvalue``) is the threshold; every
        candidate below it is taken, then the lowest-index candidates equal to it.
        """
        pick = torch.zeros_like(candidates)
        if n <= 0:
            return pick
        idx = candidates.nonzero().squeeze(1)
        if n >= idx.numel():
            pick[idx] = True
            return pick
        key = scores[idx] if lowest else -scores[idx]
        kth = torch.kthvalue(key.cpu(), n).values.to(key.device)
        below = key < kth
        need = n - int(below.sum())
        tied = (key == kth).nonzero().squeeze(1)[:need]
        pick[idx[below]] = True
        pick[idx[tied]] = True
        return pick

    def _update(self, step: int, stats: dict) -> dict[str, Any]:
        frac = self.fraction_at(step)
        scores = self._group_scores(stats)  # raises before anything changes
        keys = [(n, g.name) for n, layer in self.layers for g in layer.mode_groups()]
        groups = {(n, g.name): g for n, layer in self.layers for g in layer.mode_groups()}
        sizes = [groups[k].mask.numel() for k in keys]
        device = groups[keys[0]].mask.device
        old_d = torch.cat([groups[k].mask.detach().reshape(-1).to(device) > 0.5 for k in keys])
        old_l = torch.cat([groups[k].live_or_ones().detach().reshape(-1).to(device) > 0.5 for k in keys])
        new_d, new_l = old_d.clone(), old_l.clone()
        touched = torch.zeros_like(old_d)
        offsets, start = {}, 0
        for k, size in zip(keys, sizes):
            offsets[k] = (start, start + size)
            start += size
        if self.scope == "layer":  # a layer's groups are contiguous in ``keys``
            pools = []
            for name, _ in self.layers:
                spans = [offsets[k] for k in keys if k[0] == name]
                pools.append((spans[0][0], spans[-1][1]))
        else:
            pools = [(0, start)]

        def cat(kind: str) -> Tensor:
            return torch.cat([scores[k][kind].to(device) for k in keys])

        counts = {"pruned": torch.zeros_like(old_d), "regrown": torch.zeros_like(old_d),
                  "demoted": torch.zeros_like(old_d), "promoted": torch.zeros_like(old_d)}
        if self.prune is not None and frac > 0:
            prune_s, regrow_s = cat("prune"), cat("regrow")
            for a, b in pools:  # slices are views: writes land in the full vectors
                live, dead = old_l[a:b], ~old_l[a:b]
                n = min(round_half_up(frac * int(live.sum())), int(dead.sum()))
                pruned = self._pick(prune_s[a:b], live, n, lowest=True)
                grown = self._pick(regrow_s[a:b], dead, n, lowest=False)
                n_dd = int((pruned & old_d[a:b]).sum())
                grown_dyn = self._pick(regrow_s[a:b], grown, n_dd, lowest=False)
                new_l[a:b][pruned] = False
                new_d[a:b][pruned] = False
                new_l[a:b][grown] = True
                new_d[a:b][grown_dyn] = True
                touched[a:b] |= pruned | grown
                counts["pruned"][a:b] |= pruned
                counts["regrown"][a:b] |= grown
        mid_d = new_d.clone()  # after prune/regrow, before re-partition
        if self.repartition is not None and frac > 0:
            demote_s, promote_s = cat("demote"), cat("promote")
            for a, b in pools:
                dyn = new_d[a:b] & ~touched[a:b]
                sta = new_l[a:b] & ~new_d[a:b] & ~touched[a:b]
                n = min(round_half_up(frac * int(new_d[a:b].sum())), int(dyn.sum()), int(sta.sum()))
                demoted = self._pick(demote_s[a:b], dyn, n, lowest=True)
                promoted = self._pick(promote_s[a:b], sta, n, lowest=False)
                new_d[a:b][demoted] = False
                new_d[a:b][promoted] = True
                counts["demoted"][a:b] |= demoted
                counts["promoted"][a:b] |= promoted
        active, src = _dist(self.process_group)
        if active:  # rank 0's decision everywhere (identical already when statistics were all-reduced)
            new_d, mid_d, new_l, *rest = _flat([new_d, mid_d, new_l, *counts.values()], "broadcast",
                                               self.process_group, src)
            counts = dict(zip(counts, rest))
        self._apply(keys, offsets, groups, mid_d, new_d, new_l, counts)
        record = self._record(step, frac, keys, offsets, old_d, new_d, counts)
        self.history.append(record)
        return record

    def _apply(self, keys, offsets, groups, mid_d, new_d, new_l, counts) -> None:
        layers = dict(self.layers)
        mode_masks: dict[GroupKey, Tensor] = {}
        with torch.no_grad():
            for k in keys:
                a, b = offsets[k]
                g = groups[k]
                shape = g.shape
                pr = (counts["pruned"][a:b] | counts["regrown"][a:b]).view(shape)
                if bool(pr.any()):
                    # prune/regrow: not function-preserving by nature; both ends hold value 0 afterwards
                    layers[k[0]].set_modes(k[1], mid_d[a:b].view(shape), new_l[a:b].view(shape))
                    g.static.data[pr.to(g.static.device)] = 0
                    g.dynamic.data[:, pr.to(g.dynamic.device)] = 0
                    reset_optimizer_state_(self.optimizer, g.dynamic, pr.unsqueeze(0))
                    reset_optimizer_state_(self.optimizer, g.static, pr)
                moved = (counts["promoted"][a:b] | counts["demoted"][a:b])
                if bool(moved.any()):
                    mode_masks[k] = new_d[a:b].view(shape).to(g.mask.dtype)
        apply_mode_transitions(self.model, mode_masks, self.optimizer, self.preserve)

    def _record(self, step, frac, keys, offsets, old_d, new_d, counts) -> dict[str, Any]:
        layers: dict[str, dict[str, Any]] = {}
        by_layer: dict[str, list[GroupKey]] = {}
        for k in keys:
            by_layer.setdefault(k[0], []).append(k)
        for name, layer in self.layers:
            idx = [offsets[k] for k in by_layer[name]]

            def total(t: Tensor) -> int:
                return sum(int(t[a:b].sum()) for a, b in idx)

            prev = total(old_d)
            kept = sum(int((old_d[a:b] & new_d[a:b]).sum()) for a, b in idx)
            layers[name] = {
                "pruned": total(counts["pruned"]), "regrown": total(counts["regrown"]),
                "demoted": total(counts["demoted"]), "promoted": total(counts["promoted"]),
                "kappa": layer.dynamic_ratio(), "density": layer.density(),
                "dynamic_overlap": kept / prev if prev else 1.0,
            }
        moved = sum(v["pruned"] + v["regrown"] + v["demoted"] + v["promoted"] for v in layers.values())
        return {"step": step, "fraction": frac, "entries_moved": moved, "layers": layers}

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, generator state, running averages and history (masks live in the model)."""
        return {
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "running": {k: v.detach().cpu().clone() for k, v in self.running.items()},
            "history": [dict(r) for r in self.history],
            "config": {"update_interval": self.update_interval, "end_step": self.end_step,
                       "fraction": self.fraction, "scope": self.scope, "seed": self.seed},
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the schedule settings must match this scheduler's."""
        mine = self.state_dict()["config"]
        theirs = state.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"ModeScheduler.load_state_dict: settings differ from the saved ones: {diff}")
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        device = self.layers[0][1].mode_groups()[0].mask.device
        self.running = {k: v.to(device) for k, v in state.get("running", {}).items()}
        self.history = [dict(r) for r in state.get("history", [])]
        self.seconds = float(state.get("seconds", 0.0))
        self._data_iter = None

    def __repr__(self) -> str:
        return (f"ModeScheduler(repartition={None if self.repartition is None else self.repartition.name!r}, "
                f"growth={self.growth.name!r}, prune={None if self.prune is None else self.prune.name!r}, "
                f"regrow={self.regrow.name!r}, fraction={self.fraction}, update_interval={self.update_interval}, "
                f"end_step={self.end_step}, scope={self.scope!r}, step={self.step_count})")
