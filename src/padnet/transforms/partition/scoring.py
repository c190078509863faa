"""Stage 3 of a partition: score every mask entry with the criterion.

Scores are detached, at least float32 and shaped like their mode group;
higher = keep dynamic. A symmetric layer (every factor equals the static copy,
equal scales) gets zero scores from criteria that measure a mode flip
(``symmetric_zero``); layers whose scores are all zero are reported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .criteria import Criterion, GroupStats
from .units import LayerPlan

__all__ = ["LayerScores", "is_symmetric", "score_layers"]

LayerScores = dict[str, dict[str, Tensor]]  # layer name -> group name -> scores [*group.shape]


def is_symmetric(layer: nn.Module) -> bool:
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


def score_layers(
    crit: Criterion,
    plans: list[LayerPlan],
    stats: dict[tuple[str, str, str], Tensor],
    num_batches: int,
    iteration: int,
    generator: torch.Generator,
    criterion_kwargs: dict[str, Any],
    symmetric: set[str],
) -> tuple[LayerScores, set[str]]:
    """Scores of every group of every layer, and the layers scored all zero.

    ``stats`` is :func:`~.statistics.collect_statistics`' output (empty for
    data-free criteria); ``symmetric`` the layers whose scores are forced to
    zero when ``crit.symmetric_zero``. Stochastic criteria never report zero
    layers (their zeros carry no meaning).
    """
    out: LayerScores = {}
    zero_layers: set[str] = set()
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
                s = crit(g, st, p.layer, **criterion_kwargs)
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
                if g.live is not None:  # pruned entries never become dynamic
                    s = s.masked_fill(g.live.detach() < 0.5, -math.inf)
                layer_scores[g.name] = s
            if not crit.stochastic and all(not bool(s.any()) for s in layer_scores.values()):
                zero_layers.add(p.name)
            out[p.name] = layer_scores
    return out, zero_layers
