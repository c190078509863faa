"""Function-preserving mode transitions: change any PAD mask without changing the function.

A PAD entry is either dynamic (``lambda_d * sum_k pi_k W_k``) or static
(``lambda_s * W_s``); only one of the two copies is live, the other is dead
(zero gradient) and keeps whatever value it had. Flipping a mask alone
therefore swaps a trained value for a stale one. A *transition* first writes
the copy that becomes live so that the layer computes (as nearly as possible)
what it computed before:

- static -> dynamic: ``W_k := (lambda_s / lambda_d) * W_s / total`` for every k.
  With softmax routing (``sum_k pi_k = 1``, ``total = 1``) and for MoE experts
  (every expert holds the same value) this is exact for every input. With
  sigmoid routing ``total`` is the running mean of ``sum_k pi_k``: approximate.
- dynamic -> static: ``W_s := (lambda_d / lambda_s) * sum_k pbar_k W_k`` with
  ``pbar`` the layer's running mean routing weights (``routing_mean``, kept by
  every PAD layer over its training forwards, see :mod:`padnet.layers.modes`),
  normalised for softmax and MoE. Exact for the average input; the error is
  what the per-input routing contributed at that entry. MoE: ``pbar`` is the
  mean gate weight per expert over routed tokens.

Biases and every MoE mode group follow the same rules. Optimizer state of the
entries that changed mode is reset to zero (:func:`reset_optimizer_state_`):
moments gathered in the other mode describe a different parameter.

Everything is validated before anything is written (bad mask shape or values,
unknown layer or group, compact layers, a zero or non-finite ``lambda`` that a
transition has to divide by, NaN routing statistics): a clear error naming the
layer, and the model is left as it was -- all layers change or none.

``preserve=False`` only writes the masks (the paper's partition at
initialisation, where the dead copies are as untrained as the live ones).

Two entry points: :func:`set_modes_` (one call) and :class:`ModeTransition`
(staged: several mask proposals measured from one reference state, then
``commit()`` or ``rollback()``; Iterative Mode Partition uses it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..layers.modes import is_compact_layer, is_pad_layer, transition_weights, validate_mask
from .record import get_state, register_op

register_op("transition")  # provenance: the masks and factors it wrote are in the state dict

__all__ = [
    "LayerTransition",
    "ModeTransition",
    "TransitionReport",
    "reset_optimizer_state_",
    "set_modes_",
    "transition_factors",
]

MaskSpec = Mapping[str, Mapping[str, Tensor]]


@dataclass
class LayerTransition:
    """What a transition did to one PAD layer.

    ``to_dynamic`` / ``to_static``: entries (summed over the layer's mode
    groups) that changed mode. ``exact``: the layer computes exactly the same
    function as before for every input (only static -> dynamic changes with
    routing weights that sum to one, or nothing preserved to check).
    """

    name: str
    type: str
    to_dynamic: int
    to_static: int
    exact: bool
    optimizer_entries_reset: int = 0


@dataclass
class TransitionReport:
    """Per-layer summary of one committed transition (``to_dict()`` is JSON-ready)."""

    preserve: bool
    layers: list[LayerTransition] = field(default_factory=list)

    @property
    def to_dynamic(self) -> int:
        return sum(r.to_dynamic for r in self.layers)

    @property
    def to_static(self) -> int:
        return sum(r.to_static for r in self.layers)

    @property
    def optimizer_entries_reset(self) -> int:
        return sum(r.optimizer_entries_reset for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preserve": self.preserve,
            "to_dynamic": self.to_dynamic,
            "to_static": self.to_static,
            "optimizer_entries_reset": self.optimizer_entries_reset,
            "layers": [asdict(r) for r in self.layers],
        }

    def summary(self) -> dict[str, Any]:
        """Totals only (the ``"transition"`` step of the transform record): JSON, no per-layer rows."""
        return {
            "preserve": self.preserve,
            "layers_changed": sum(1 for r in self.layers if r.to_dynamic or r.to_static),
            "to_dynamic": self.to_dynamic,
            "to_static": self.to_static,
            "exact": all(r.exact for r in self.layers),
        }


# --------------------------------------------------------------------------------------------
# the math (pure)
# --------------------------------------------------------------------------------------------


def transition_factors(
    dynamic: Tensor,
    static: Tensor,
    old_mask: Tensor,
    new_mask: Tensor,
    lambda_s: Tensor | float,
    lambda_d: Tensor | float,
    mix: Tensor,
    total: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    """New ``(dynamic [K, *shape], static [*shape])`` for a mask change (pure; computed in float64).

    Entries with ``old_mask = 0, new_mask = 1`` get ``W_k = (lambda_s / lambda_d) W_s / total``;
    entries with ``old_mask = 1, new_mask = 0`` get ``W_s = (lambda_d / lambda_s) sum_k mix_k W_k``;
    every other entry keeps its values. ``mix``: ``[K]`` mixing weights.
    """
    old = old_mask.detach() > 0.5
    new = new_mask.detach() > 0.5
    to_dynamic = new & ~old
    to_static = old & ~new
    ls = torch.as_tensor(lambda_s, dtype=torch.float64, device=static.device)
    ld = torch.as_tensor(lambda_d, dtype=torch.float64, device=static.device)
    tot = torch.as_tensor(total, dtype=torch.float64, device=static.device)
    new_static, new_dynamic = static.detach(), dynamic.detach()
    if bool(to_static.any()):
        folded = torch.einsum("k,k...->...", mix.to(device=static.device, dtype=torch.float64),
                              dynamic.detach().double()) * (ld / ls)
        new_static = torch.where(to_static, folded.to(static.dtype), new_static)
    if bool(to_dynamic.any()):
        spread = (static.detach().double() * (ls / (ld * tot))).to(dynamic.dtype)
        new_dynamic = torch.where(to_dynamic.unsqueeze(0), spread.unsqueeze(0), new_dynamic)
    return new_dynamic, new_static


def reset_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: Tensor, entries: Tensor) -> int:
    """Zero the optimizer state of ``param`` at ``entries`` (bool, broadcastable to ``param``); in place.

    Every per-entry state tensor (same shape as the parameter: SGD's
    ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, ...) is zeroed there; scalar state (Adam's ``step``)
    is shared by the whole tensor and left alone, so the first Adam update of a
    reset entry is not bias-corrected (as in dynamic-sparse-training code that
    resets regrown weights). Returns the number of parameter entries reset
    (0 when the optimizer holds no state for ``param``).
    """
    if optimizer is None:
        return 0
    state = optimizer.state.get(param)
    if not state:
        return 0
    where = entries.to(param.device).expand(param.shape)
    touched = False
    with torch.no_grad():
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(where, 0)
                touched = True
    return int(where.sum()) if touched else 0


# --------------------------------------------------------------------------------------------
# the staged transition
# --------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """A group's tensors as they were before the session changed them."""

    dynamic: Tensor
    static: Tensor
    mask: Tensor


class ModeTransition:
    """Staged mode transitions on the PAD layers of ``model``.

    ``set_masks(masks)`` (any number of times) validates ``masks`` --
    ``{layer_name: {group_name: mask}}``, any subset of layers and groups --
    and writes masks and, with ``preserve``, the transitioned factors. Every
    proposal is computed from the state the session started from, so a
    sequence of proposals equals one transition from the start to the last
    (an entry that goes static and back keeps its original kernels).
    ``commit()`` resets the optimizer state of entries whose mode differs from
    the start and returns a :class:`TransitionReport`; ``rollback()`` restores
    masks and factors. ``lambda`` and the routing statistics are read once,
    when the session starts.

    Args:
        model: a model with PAD layers, or one PAD layer (name ``""``).
        preserve: write the function-preserving values (``False``: masks only).
        optimizer: its state of changed entries is reset on ``commit()``.
        routing: optional ``{layer_name: mix [K]}`` mixing weights for
            dynamic -> static, replacing the layer's running ``routing_mean``
            (e.g. measured on the partition batches,
            :func:`padnet.transforms.diagnostics.measure_routing`).
        keep_reference: keep copies of changed groups so that later proposals
            and ``rollback()`` start from the original state (default). The
            one-shot :func:`set_modes_` turns it off (no copies).
        record: on a ``commit()`` that changed any mode, append a ``"transition"``
            step (:meth:`TransitionReport.summary`, totals only) to the model's
            transform record. Transforms that record the change in their own step
            (``partition_``, ``ModeGates.harden_``, ``ModeScheduler``) pass ``False``.
            A bare PAD layer passed as ``model`` is never recorded on (the record
            belongs to the whole model).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        preserve: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        routing: Mapping[str, Tensor] | None = None,
        keep_reference: bool = True,
        record: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"mode transitions need an nn.Module, got {type(model).__name__}")
        if not isinstance(preserve, bool):
            raise TypeError(f"preserve must be True or False, got {preserve!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        model = _unwrap(model)
        self.record = bool(record) and not is_pad_layer(model)
        self._model = model
        self.layers: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if is_pad_layer(m)}
        self.compact = [n for n, m in model.named_modules() if is_compact_layer(m)]
        if not self.layers:
            if self.compact:
                raise ValueError(
                    f"mode transitions need the training form of the PAD layers; {self.compact[:3]} "
                    f"{'are' if len(self.compact) > 1 else 'is'} compact (deploy form, padnet.compact_): masks are "
                    "frozen there. Transition before compacting."
                )
            raise ValueError("model has no PAD layers (run padnet.dynamize_ first)")
        self.preserve = preserve
        self.optimizer = optimizer
        self.keep_reference = keep_reference
        self._routing = self._check_routing(routing or {})
        # read once: scoring forwards in train mode may touch routing_mean afterwards
        self._scales = {n: tuple(s.detach().double().clone() for s in m.scales()) for n, m in self.layers.items()}
        self._routing_mean = {n: m.routing_mean.detach().clone() for n, m in self.layers.items()
                              if getattr(m, "routing_mean", None) is not None}
        self._reference: dict[tuple[str, str], _Reference] = {}
        self._closed = False

    # ---------------------------------------------------------------- checks
    def _check_routing(self, routing: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(routing, Mapping):
            raise TypeError(f"routing must map layer names to [K] tensors, got {type(routing).__name__}")
        out = {}
        for name, mix in routing.items():
            layer = self._layer(name)
            k = layer.mode_groups()[0].num_factors
            if not isinstance(mix, Tensor) or tuple(mix.shape) != (k,):
                got = tuple(mix.shape) if isinstance(mix, Tensor) else type(mix).__name__
                raise ValueError(f"routing[{name!r}]: expected a tensor of shape ({k},), got {got}")
            transition_weights(mix, True, f"routing[{name!r}]")  # finite, >= 0, not all zero
            out[name] = mix.detach().double().clone()
        return out

    def _layer(self, name: str) -> nn.Module:
        if name in self.layers:
            return self.layers[name]
        if name in self.compact:
            raise ValueError(f"layer {name!r} is compact (deploy form): its masks are frozen; "
                             "transition the training form before padnet.compact_")
        raise KeyError(f"no PAD layer {name!r}; PAD layers: {sorted(self.layers)[:20]}"
                       + (" ..." if len(self.layers) > 20 else ""))

    def _weights(self, name: str, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """``(mix [K], total)`` for ``layer`` (validated; errors name the layer)."""
        normalize = bool(layer.routing_sums_to_one or layer.routing_normalize_mix)
        mean = self._routing.get(name, self._routing_mean.get(name))
        if mean is None:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) keeps no routing statistics (routing_mean)")
        try:
            return transition_weights(mean, normalize, f"layer {name!r}")
        except ValueError as exc:
            raise ValueError(f"{exc}; measure them (padnet.transforms.diagnostics.measure_routing) and pass "
                             f"routing=..., or use preserve=False") from None

    def _plan(self, masks: MaskSpec) -> list[tuple[str, Any, Tensor, Tensor, Tensor, Tensor]]:
        """Validate everything; return ``[(layer, group, base_mask, new_mask, new_dynamic, new_static)]``."""
        if self._closed:
            raise RuntimeError("this ModeTransition was already committed or rolled back")
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must map layer names to {{group: mask}}, got {type(masks).__name__}")
        plan = []
        for name, groups in masks.items():
            layer = self._layer(name)
            if not isinstance(groups, Mapping):
                raise TypeError(f"masks[{name!r}] must map group names to masks, got {type(groups).__name__}")
            by_name = {g.name: g for g in layer.mode_groups()}
            lambda_s, lambda_d = self._scales[name]
            weights = None
            for group, mask in groups.items():
                if group not in by_name:
                    raise KeyError(f"layer {name!r} ({type(layer).__name__}) has no mode group {group!r}; "
                                   f"groups: {list(by_name)}")
                g = by_name[group]
                new_mask = validate_mask(mask, g.shape, f"layer {name!r} group {group!r}").to(g.mask.device)
                ref = self._reference.get((name, group))
                base_mask = ref.mask if ref is not None else g.mask.detach()
                base_dyn = ref.dynamic if ref is not None else g.dynamic.detach()
                base_sta = ref.static if ref is not None else g.static.detach()
                new_bool, old_bool = new_mask.bool(), base_mask > 0.5
                to_dynamic, to_static = new_bool & ~old_bool, old_bool & ~new_bool
                if self.preserve and bool(to_static.any()):
                    _check_scale(name, "lambda_s", lambda_s, "dynamic -> static")
                    _check_scale(name, "lambda_d", lambda_d, "dynamic -> static")
                if self.preserve and bool(to_dynamic.any()):
                    _check_scale(name, "lambda_d", lambda_d, "static -> dynamic")
                    _check_scale(name, "lambda_s", lambda_s, "static -> dynamic")
                if self.preserve and (bool(to_static.any()) or bool(to_dynamic.any())):
                    if weights is None:
                        weights = self._weights(name, layer)
                    mix, total = weights
                    new_dyn, new_sta = transition_factors(base_dyn, base_sta, base_mask, new_mask, lambda_s,
                                                          lambda_d, mix, total)
                    for what, t, base in (("dynamic factors", new_dyn, base_dyn), ("static copy", new_sta, base_sta)):
                        if not bool(torch.isfinite(t).all()) and bool(torch.isfinite(base).all()):
                            raise ValueError(f"layer {name!r} group {group!r}: the transition produced non-finite "
                                             f"{what} (lambda_s / lambda_d overflows the dtype)")
                else:
                    new_dyn, new_sta = base_dyn, base_sta
                plan.append((name, g, base_mask, new_mask, new_dyn, new_sta))
        return plan

    # ----------------------------------------------------------------- apply
    def set_masks(self, masks: MaskSpec) -> None:
        """Validate, then write every given mask (and, with ``preserve``, the transitioned factors)."""
        plan = self._plan(masks)
        with torch.no_grad():
            for name, g, base_mask, new_mask, new_dyn, new_sta in plan:
                key = (name, g.name)
                changes = not torch.equal(new_mask.to(g.mask.dtype), g.mask.detach())
                if key not in self._reference and changes:
                    if self.keep_reference:
                        self._reference[key] = _Reference(g.dynamic.detach().clone(), g.static.detach().clone(),
                                                          g.mask.detach().clone())
                    else:  # one-shot: only which entries changed (optimizer reset, report); no copies
                        self._reference[key] = _Reference(g.dynamic.new_empty(0), g.static.new_empty(0),
                                                          g.mask.detach().clone())
                if self.preserve:
                    if new_dyn is not g.dynamic and not _same(new_dyn, g.dynamic):
                        g.dynamic.copy_(new_dyn)
                    if new_sta is not g.static and not _same(new_sta, g.static):
                        g.static.copy_(new_sta)
                if changes:
                    g.mask.copy_(new_mask.to(g.mask.dtype))

    def commit(self) -> TransitionReport:
        """Reset optimizer state of entries that changed mode; return the report. Ends the session."""
        if self._closed:
            raise RuntimeError("this ModeTransition was already committed or rolled back")
        rows: dict[str, LayerTransition] = {}
        for (name, group), ref in self._reference.items():
            layer = self.layers[name]
            g = {x.name: x for x in layer.mode_groups()}[group]
            old, new = ref.mask > 0.5, g.mask.detach() > 0.5
            changed = old != new
            to_dyn, to_sta = int((new & ~old).sum()), int((old & ~new).sum())
            row = rows.setdefault(name, LayerTransition(name, type(layer).__name__, 0, 0, True))
            row.to_dynamic += to_dyn
            row.to_static += to_sta
            if to_sta or (to_dyn and not layer.routing_sums_to_one) or (not self.preserve and (to_dyn or to_sta)):
                row.exact = False
            if bool(changed.any()):
                row.optimizer_entries_reset += reset_optimizer_state_(self.optimizer, g.static, changed)
                row.optimizer_entries_reset += reset_optimizer_state_(self.optimizer, g.dynamic, changed.unsqueeze(0))
        self._closed = True
        self._reference.clear()
        order = list(self.layers)
        report = TransitionReport(self.preserve, sorted(rows.values(), key=lambda r: order.index(r.name)))
        if self.record and (report.to_dynamic or report.to_static):
            get_state(self._model).append("transition", **report.summary())
        return report

    def rollback(self) -> None:
        """Restore masks and factors of every changed group (needs ``keep_reference``). Ends the session."""
        if self._closed:
            return
        if not self.keep_reference and self._reference:
            raise RuntimeError("rollback needs keep_reference=True")
        with torch.no_grad():
            for (name, group), ref in self._reference.items():
                g = {x.name: x for x in self.layers[name].mode_groups()}[group]
                g.dynamic.copy_(ref.dynamic)
                g.static.copy_(ref.static)
                g.mask.copy_(ref.mask)
        self._reference.clear()
        self._closed = True


def set_modes_(
    model: nn.Module,
    masks: MaskSpec,
    *,
    preserve: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    routing: Mapping[str, Tensor] | None = None,
    record: bool = True,
) -> TransitionReport:
    """Set any PAD masks of ``model`` with function-preserving transitions, in place.

    Args:
        model: a model with PAD layers (or one PAD layer, named ``""``); DDP /
            DataParallel wrappers are unwrapped.
        masks: ``{layer_name: {group_name: mask}}``; any subset of layers and of
            their mode groups (``"weight"``/``"bias"`` for convs,
            ``"in"``/``"out"``/``"bias_in"``/``"bias_out"`` for MoE). Masks are
            0/1 (float or bool) of the group's shape.
        preserve: write the transitioned factors (``False``: masks only).
        optimizer: its per-entry state (momentum, Adam moments) of every entry
            that changed mode is reset to zero.
        routing: optional ``{layer_name: [K] mixing weights}`` replacing the
            running ``routing_mean`` for dynamic -> static.
        record: append a ``"transition"`` step (totals) to the model's transform
            record when any mode changed (see :class:`ModeTransition`).

    Returns:
        :class:`TransitionReport`. On any error nothing is changed.
    """
    session = ModeTransition(model, preserve=preserve, optimizer=optimizer, routing=routing, keep_reference=False,
                             record=record)
    session.set_masks(masks)
    return session.commit()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_scale(name: str, which: str, value: Tensor, direction: str) -> None:
    v = float(value)
    if not math.isfinite(v) or v == 0.0:
        raise ValueError(
            f"layer {name!r}: {which} = {v} -- a {direction} transition divides by it. The scale parameter "
            f"phi has saturated (lambda_d = 2 sigmoid(phi)); reset it (layer.scale.phi) or use preserve=False."
        )


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model
