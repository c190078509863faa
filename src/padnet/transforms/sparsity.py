"""The pruned mode: density distributions, effective-weight views and pruning to a density.

A PAD layer's entries are dynamic (K values), static (1 value) or pruned (0
values; see :mod:`padnet.layers.modes`). This module holds what both the
one-shot :func:`partition_` (``density=...``) and the training-time
:class:`~padnet.transforms.scheduler.ModeScheduler` need:

- :func:`layer_densities`: per-group densities for a global target,
  ``"uniform"`` (every group the same) or ``"erk"`` (Erdos-Renyi-Kernel:
  density proportional to ``sum(shape) / prod(shape)``, i.e.
  ``(n_out + n_in + k_h + k_w) / (n_out n_in k_h k_w)`` for a conv kernel,
  capped at 1 with the excess redistributed over the other groups).
- :func:`effective_view`: a mode group seen as one ordinary weight tensor, so
  that the registered criteria (which score ``mean_k`` over dynamic factors)
  score *entries* for pruning: ``w_j = lambda_d mean_k W_kj`` (dynamic),
  ``lambda_s W_sj`` (static), ``0`` (pruned), and
  ``g_j = dL/dW_hat_j`` summed over the scoring batches.
- :func:`prune_to_density_`: assign live masks for a density target in one
  call (used by ``partition_(..., density=...)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.modes import ModeGroup, pad_layers
from .transitions import reset_optimizer_state_

__all__ = [
    "DISTRIBUTIONS",
    "check_density",
    "erk_densities",
    "layer_densities",
    "effective_view",
    "prune_to_density_",
    "round_half_up",
]

DISTRIBUTIONS = ("uniform", "erk")


def round_half_up(x: float) -> int:
    """``round`` with halves going up (matches the partitioner's rounding)."""
    return int(math.floor(x + 0.5 + 1e-9))


def check_density(density: Any, what: str = "density") -> float:
    """Validate a density (fraction of entries not pruned) in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{what} must be a number in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {density}")
    return float(density)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities of tensors ``shapes`` for a global ``density``.

    ``d_i = min(1, eps * sum(shape_i) / prod(shape_i))`` with ``eps`` chosen so
    that ``sum_i d_i n_i = density * sum_i n_i`` (``n_i = prod(shape_i)``):
    tensors whose ERK density would exceed 1 are made dense and ``eps`` is
    recomputed over the rest until none exceeds 1. A 1-D tensor (a bias) has
    ``sum = prod`` and so is dense whenever ``eps >= 1``.
    """
    density = check_density(density)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / max(sizes[k], 1) for k, s in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[k] for k in dense)
        rest = [k for k in shapes if k not in dense]
        denom = sum(raw[k] * sizes[k] for k in rest)
        if not rest or denom <= 0:
            break
        eps = budget / denom
        over = [k for k in rest if eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    out = {}
    for k in shapes:
        out[k] = 1.0 if k in dense else max(0.0, min(1.0, eps * raw[k]))
    return out


def layer_densities(model: nn.Module, density: float, distribution: str = "uniform") -> dict[tuple[str, str], float]:
    """Per ``(layer, group)`` density for a global target over every PAD layer's mode groups."""
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown density distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    groups = {(n, g.name): g for n, layer in pad_layers(model) for g in layer.mode_groups()}
    if distribution == "uniform":
        return {k: density for k in groups}
    shapes = {f"{n}:{gname}": tuple(g.shape) for (n, gname), g in groups.items()}
    erk = erk_densities(shapes, density)
    return {(n, gname): erk[f"{n}:{gname}"] for (n, gname) in groups}


def effective_weight(group: ModeGroup, lambda_s: Tensor, lambda_d: Tensor) -> Tensor:
    """``[*shape]`` entry weights in float32+: ``lambda_d mean_k W_k`` (dynamic), ``lambda_s W_s`` (static), 0 (pruned)."""
    dtype = torch.promote_types(group.static.dtype, torch.float32)
    mask = group.mask.detach().to(dtype)
    live = group.live_or_ones().detach().to(dtype)
    dyn = group.dynamic.detach().to(dtype).mean(0) * lambda_d.to(dtype)
    sta = group.static.detach().to(dtype) * lambda_s.to(dtype)
    return mask * dyn + (live - mask) * sta


def effective_grad(group: ModeGroup, lambda_s: Tensor, lambda_d: Tensor, dynamic_grad: Tensor | None,
                   static_grad: Tensor | None) -> Tensor | None:
    """``[*shape]`` dL/dW_hat summed over batches, from the factor gradients.

    Dynamic entries: ``sum_k dL/dW_k / lambda_d`` (exact for softmax routing,
    where ``sum_k pi_k = 1``); other entries: ``dL/dW_s / lambda_s`` (for
    pruned entries this needs the dense probe, see ModeScheduler).
    """
    if dynamic_grad is None or static_grad is None:
        return None
    dtype = torch.promote_types(dynamic_grad.dtype, torch.float32)
    mask = group.mask.detach().to(dtype)
    g_dyn = dynamic_grad.to(dtype).sum(0) / lambda_d.to(dtype)
    g_sta = static_grad.to(dtype) / lambda_s.to(dtype)
    return mask * g_dyn + (1.0 - mask) * g_sta


def effective_view(group: ModeGroup, weight: Tensor, grad: Tensor | None) -> ModeGroup:
    """The group as one plain weight tensor (``K = 1``, no static copy) for entry criteria."""
    return ModeGroup(group.name, weight.unsqueeze(0), torch.zeros_like(weight), group.mask, group.channel_dim,
                     group.kernel_dims, group.live)


@torch.no_grad()
def prune_to_density_(
    model: nn.Module,
    density: float,
    distribution: str = "uniform",
    criterion: str = "magnitude",
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Prune every PAD layer's mode groups to a density, in place; returns per-layer densities.

    Entries are ranked per group by a data-free entry criterion on the
    effective weights (``"magnitude"``: ``|w_j|``; ``"random"``: seeded
    uniform scores); the top ``round(d_g * n_g)`` stay live (ties: lower
    index), the rest are pruned: their mode mask and live mask become 0 and
    their stored values (``W_s`` and every ``W_k``) are zeroed, so a later
    regrowth starts from 0; with ``optimizer`` (pruning mid-training) their
    optimizer moments are reset too. Everything is validated before anything changes.
    """
    density = check_density(density)
    if criterion not in ("magnitude", "random"):
        raise ValueError(f"unknown initial pruning criterion {criterion!r}; expected 'magnitude' or 'random'")
    layers = list(pad_layers(model))
    if not layers:
        raise ValueError("model has no PAD layers to prune; run padnet.dynamize_ first")
    targets = layer_densities(model, density, distribution)
    generator = torch.Generator().manual_seed(int(seed))
    plan = []
    for name, layer in layers:
        lambda_s, lambda_d = (s.detach() for s in layer.scales())
        for g in layer.mode_groups():
            n = g.mask.numel()
            keep = min(n, max(1, round_half_up(targets[(name, g.name)] * n)))
            if criterion == "random":
                scores = torch.rand(n, generator=generator, dtype=torch.float64)
            else:
                scores = effective_weight(g, lambda_s, lambda_d).abs().reshape(-1).cpu().double()
            if g.live is not None:  # already pruned entries rank last
                scores = torch.where(g.live.detach().reshape(-1).cpu() > 0.5, scores, torch.full_like(scores, -1.0))
            order = torch.argsort(-scores, stable=True)
            live = torch.zeros(n, dtype=torch.bool)
            live[order[:keep]] = True
            live = live.view(g.shape).to(g.mask.device)
            plan.append((layer, g, live))
    for layer, g, live in plan:
        new_mask = g.mask.detach().bool() & live
        layer.set_modes(g.name, new_mask, live)
        dead = ~live
        g.static.data[dead] = 0
        g.dynamic.data[:, dead] = 0
        reset_optimizer_state_(optimizer, g.static, dead)
        reset_optimizer_state_(optimizer, g.dynamic, dead.unsqueeze(0))
    return {name: layer.density() for name, layer in layers}
