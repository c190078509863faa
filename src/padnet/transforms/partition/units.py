"""Decision units (granularity) and exact top-k selection.

A *unit* is the set of mask entries decided together:

- ``"element"``: every entry is its own unit.
- ``"kernel"``: one unit per index of the group's leading ``kernel_dims`` axes
  (an output x input pair of a conv: its ``kh * kw`` taps). Groups with no
  trailing axes (linear weights, 1-D biases) are element-wise.
- ``"channel"``: one unit per index along ``channel_dim`` (an output channel).
  A 1-D bias group joins its partner weight group's channels (``"bias"`` ->
  ``"weight"``, ``"bias_<x>"`` -> ``"<x>"``) when the lengths match, so the bias
  entry is decided together with its channel; otherwise (or with
  ``channel_dim=None``) each entry is its own channel.

A unit's score is the **mean** of its entries' scores; its size is its entry
count. Selection keeps the best units (ties broken by lower index) whose total
size is closest to the target number of entries: exact for element units,
exact to one unit's size for structured ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...layers.modes import ModeGroup

GRANULARITIES = ("element", "kernel", "channel")

__all__ = ["GRANULARITIES", "LayerPlan", "round_half_up", "select_top"]


def round_half_up(x: float) -> int:
    """``round`` with halves going up (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass
class _GroupLayout:
    group: ModeGroup
    kind: str  # "element" | "rows" (kernel / channel along axis) | "bias_of" (joins a partner's channels)
    axis: int | None = None  # channel axis for "rows" (None = leading kernel axes)
    num_units: int = 0
    offset: int = 0  # first unit id within the layer
    partner: str | None = None


def _partner_name(name: str) -> str | None:
    if name == "bias":
        return "weight"
    if name.startswith("bias_"):
        return name[len("bias_"):]
    return None


class LayerPlan:
    """How one PAD layer's mode groups map to decision units."""

    def __init__(self, name: str, layer: nn.Module, granularity: str) -> None:
        self.name = name
        self.layer = layer
        self.granularity = granularity
        self.groups: list[ModeGroup] = layer.mode_groups()
        self.num_entries = sum(g.mask.numel() for g in self.groups)
        by_name = {g.name: g for g in self.groups}
        layouts: dict[str, _GroupLayout] = {}
        for g in self.groups:
            shape = tuple(g.shape)
            if granularity == "kernel" and len(shape) > 1:
                kd = max(1, min(g.kernel_dims, len(shape)))
                n = math.prod(shape[:kd])
                layouts[g.name] = _GroupLayout(g, "element" if n == g.mask.numel() else "kernel", None, n)
            elif granularity == "channel" and g.channel_dim is not None and len(shape) > 1:
                layouts[g.name] = _GroupLayout(g, "channel", g.channel_dim, shape[g.channel_dim])
            else:
                layouts[g.name] = _GroupLayout(g, "element", None, g.mask.numel())
        if granularity == "channel":
            for g in self.groups:
                partner = _partner_name(g.name)
                p = by_name.get(partner) if partner else None
                if (
                    p is not None and g.mask.dim() == 1 and layouts[p.name].kind == "channel"
                    and p.shape[p.channel_dim] == g.shape[0]
                ):
                    layouts[g.name] = _GroupLayout(g, "bias_of", None, 0, partner=p.name)
        offset = 0
        for lay in layouts.values():
            lay.offset = offset
            offset += lay.num_units
        self.layouts = layouts
        self.num_units = offset
        self.structured = any(lay.kind != "element" for lay in layouts.values())

    # ---- unit reductions -------------------------------------------------------------------
    def _rows(self, lay: _GroupLayout, t: Tensor) -> Tensor:
        """View ``t`` (group shape) as ``[num_units, per_unit]``."""
        if lay.kind == "channel":
            return t.movedim(lay.axis, 0).reshape(lay.num_units, -1)
        return t.reshape(lay.num_units, -1)

    def unit_sums(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-unit ``(sum, count)`` of per-entry values (counts are unit sizes)."""
        device = next(iter(tensors.values())).device
        sums = torch.zeros(self.num_units, dtype=dtype, device=device)
        counts = torch.zeros(self.num_units, dtype=torch.long, device=device)
        for lay in self.layouts.values():
            t = tensors[lay.group.name].to(device=device, dtype=dtype)
            if lay.kind == "bias_of":
                target = self.layouts[lay.partner]
                sl = slice(target.offset, target.offset + target.num_units)
                sums[sl] += t
                counts[sl] += 1
                continue
            sl = slice(lay.offset, lay.offset + lay.num_units)
            if lay.kind == "element":
                sums[sl] = t.reshape(-1)
                counts[sl] = 1
            else:
                rows = self._rows(lay, t)
                sums[sl] = rows.sum(1)
                counts[sl] = rows.shape[1]
        return sums, counts

    def unit_scores(self, scores: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``(unit scores = mean over the unit, unit sizes or None when all units are single entries)``."""
        if not self.structured:
            flat = torch.cat([scores[g.name].reshape(-1).to(dtype) for g in self.groups]) if self.groups else None
            return flat, None
        sums, counts = self.unit_sums(scores, dtype)
        return sums / counts.to(dtype), counts

    def unit_live(self) -> Tensor:
        """Bool per unit: at least one of its entries is currently dynamic."""
        masks = {g.name: (g.mask.detach() > 0.5) for g in self.groups}
        if not self.structured:
            return torch.cat([m.reshape(-1) for m in masks.values()])
        sums, _ = self.unit_sums({k: v.float() for k, v in masks.items()}, torch.float32)
        return sums > 0

    def decode(self, keep: Tensor) -> dict[str, Tensor]:
        """Unit decisions (bool ``[num_units]``) -> per-group bool masks."""
        out: dict[str, Tensor] = {}
        for lay in self.layouts.values():
            g = lay.group
            shape = tuple(g.shape)
            if lay.kind == "bias_of":
                target = self.layouts[lay.partner]
                out[g.name] = keep[target.offset: target.offset + target.num_units].reshape(shape)
                continue
            k = keep[lay.offset: lay.offset + lay.num_units]
            if lay.kind == "element":
                out[g.name] = k.reshape(shape)
            elif lay.kind == "channel":
                view = [1] * len(shape)
                view[lay.axis] = shape[lay.axis]
                out[g.name] = k.reshape(view).expand(shape)
            else:
                per = g.mask.numel() // lay.num_units
                out[g.name] = k.unsqueeze(1).expand(lay.num_units, per).reshape(shape)
        return out


def _top(scores: Tensor, sizes: Tensor | None, target: int) -> Tensor:
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if n == 0 or target <= 0:
        return keep
    if sizes is None:
        if target >= n:
            keep.fill_(True)
            return keep
        # target-th largest value; everything above it is kept, ties by lower index.
        v = torch.kthvalue(scores, n - target + 1).values
        keep = scores > v
        rest = target - int(keep.sum())
        if rest > 0:
            tie = (scores == v).nonzero().squeeze(1)[:rest]
            keep[tie] = True
        return keep
    order = torch.argsort(scores, descending=True, stable=True)
    cum = torch.cumsum(sizes[order], 0)
    p = int(torch.searchsorted(cum, torch.tensor([target], device=cum.device, dtype=cum.dtype), right=True))
    if p < n:
        below = int(cum[p - 1]) if p > 0 else 0
        above = int(cum[p])
        if above - target < target - below:
            p += 1
    keep[order[:p]] = True
    return keep


def select_top(scores: Tensor, sizes: Tensor | None, target: int, live: Tensor | None = None) -> Tensor:
    """Keep the best units whose total size is (closest to) ``target`` entries.

    ``scores``: 1-D unit scores (NaN counts as -inf); ``sizes``: unit sizes or
    ``None`` (all 1, exact). Ties are broken by lower index. With ``live``
    (monotone ranking) currently dynamic units outrank static ones: if
    ``target`` fits into the live units they are ranked among themselves,
    otherwise all live units are kept and the rest is filled from static units
    by score.
    """
    scores = torch.nan_to_num(scores, nan=-math.inf)
    if live is None:
        return _top(scores, sizes, target)
    keep = torch.zeros_like(live)
    n_live = int(live.sum()) if sizes is None else int(sizes[live].sum())
    if target <= n_live:
        idx = live.nonzero().squeeze(1)
        keep[idx] = _top(scores[idx], None if sizes is None else sizes[idx], target)
    else:
        keep |= live
        idx = (~live).nonzero().squeeze(1)
        keep[idx] = _top(scores[idx], None if sizes is None else sizes[idx], target - n_live)
    return keep
