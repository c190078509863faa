"""Stage 4 of a partition: pick the entries that stay dynamic and write the masks.

At iteration ``t`` of ``T`` the schedule gives the kept ratio ``r_t``
(exactly ``kappa`` at ``t = T``); the best ``round(r_t * N)`` entries (by unit
score, ties to the lower index) stay dynamic over all PAD layers together
(``scope="global"``, ``N`` = all maskable entries, ``r_t`` scheduled from the
global ratio before the call) or per layer (``scope="layer"``, each layer from
its own ratio before the call). Monotone ranking keeps currently dynamic units
ahead of static ones.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .scoring import LayerScores
from .units import LayerPlan, round_half_up, select_top

__all__ = ["MaskWriter", "apply_selection", "scheduled_ratio", "select_units", "write_masks"]

MaskWriter = Callable[[dict[str, dict[str, Tensor]]], None]  # {layer: {group: bool mask}} -> None


def scheduled_ratio(schedule: Callable, t: int, T: int, kappa: float, start: float) -> float:
    """Kept ratio of iteration ``t``: ``kappa`` at ``t = T``, else the schedule's value clamped to [0, 1]."""
    if t == T:
        return kappa
    r = float(schedule(t, T, kappa, start))
    if not math.isfinite(r):
        raise ValueError(f"schedule returned {r} at iteration {t}/{T}")
    return min(max(r, 0.0), 1.0)


def select_units(
    plans: list[LayerPlan],
    scores: LayerScores,
    scope: str,
    ratio_at: Callable[[float], float],
    start_global: float,
    ratios_before: dict[str, float],
    monotone: bool,
    total: int,
) -> tuple[list[Tensor], float]:
    """Per-layer bool unit decisions and the scheduled number of entries (float)."""
    dtype = torch.float32
    for layer_scores in scores.values():
        for s in layer_scores.values():
            dtype = torch.promote_types(dtype, s.dtype)
    device = plans[0].groups[0].mask.device
    units = [p.unit_scores(scores[p.name], dtype) for p in plans]
    lives = [p.unit_live() if monotone else None for p in plans]
    structured = any(sizes is not None for _, sizes in units)

    def sizes_of(i: int) -> Tensor | None:
        u, sizes = units[i]
        if not structured:
            return None
        return sizes.to(device) if sizes is not None else torch.ones(u.numel(), dtype=torch.long, device=device)

    if scope == "global":
        r = ratio_at(start_global)
        target = round_half_up(r * total)
        flat = torch.cat([u.to(device) for u, _ in units])
        sizes = torch.cat([sizes_of(i) for i in range(len(plans))]) if structured else None
        live = torch.cat([lv.to(device) for lv in lives]) if monotone else None
        keep = select_top(flat, sizes, target, live)
        keeps, start = [], 0
        for u, _ in units:
            keeps.append(keep[start: start + u.numel()])
            start += u.numel()
        return keeps, r * total
    keeps, scheduled_entries = [], 0.0
    for i, p in enumerate(plans):
        r = ratio_at(ratios_before[p.name])
        target = round_half_up(r * p.num_entries)
        u = units[i][0].to(device)
        keeps.append(select_top(u, sizes_of(i), target, None if lives[i] is None else lives[i].to(device)))
        scheduled_entries += r * p.num_entries
    return keeps, scheduled_entries


def apply_selection(
    plans: list[LayerPlan],
    scores: LayerScores,
    scope: str,
    schedule: Callable,
    t: int,
    T: int,
    kappa: float,
    start_global: float,
    ratios_before: dict[str, float],
    monotone: bool,
    total: int,
    write: MaskWriter | None = None,
) -> float:
    """Select and write the masks of iteration ``t``; returns the scheduled number of entries (float).

    ``write`` receives ``{layer name: {group name: bool mask}}`` (default
    :func:`write_masks`: ``layer.set_mode_mask`` for every group); a caller that
    changes modes in another way (e.g. function-preserving transitions) passes
    its own.
    """
    keeps, scheduled_entries = select_units(
        plans, scores, scope, lambda start: scheduled_ratio(schedule, t, T, kappa, start),
        start_global, ratios_before, monotone, total,
    )
    masks = {p.name: p.decode(keep.to(p.groups[0].mask.device)) for p, keep in zip(plans, keeps)}
    (write or (lambda m: write_masks(plans, m)))(masks)
    return scheduled_entries


def write_masks(plans: list[LayerPlan], masks: dict[str, dict[str, Tensor]]) -> None:
    """``layer.set_mode_mask(group, mask)`` for every group of every planned layer."""
    for p in plans:
        for g in p.groups:
            p.layer.set_mode_mask(g.name, masks[p.name][g.name])
