"""Routing diagnostics: does a PAD layer actually route, and do its kernels differ?

- :func:`routing_probe` collects the routing weights every PAD layer computes
  while it is active (dynamic conv: ``pi [B, K]``; MoE: the per-token gate
  matrix ``[N, E]``, zero for experts a token was not routed to).
- :func:`summarize_routing` turns them into per-layer numbers:
  ``entropy`` (mean over inputs of ``-sum_k p_k log p_k`` of the weights
  normalised to sum one, in nats; ``entropy_normalized`` divides by ``log K``,
  1 = uniform), ``pi_std`` (standard deviation over inputs of each ``pi_k``,
  averaged over k: 0 = the layer computes the same kernel for every input) and
  ``pi_mean`` (``[K]``).
- :func:`kernel_spread` is the mean pairwise cosine distance ``1 - cos(W_i, W_j)``
  between the K live dynamic factors (``lambda_d * M * W_k``, all mode groups
  concatenated): 0 = identical kernels, ~1 = unrelated ones.
- :func:`measure_routing` is the mean routing weight per layer over some
  batches (the mixing weights of a dynamic -> static transition measured on
  data instead of the running mean).
"""

from __future__ import annotations

import collections.abc
import contextlib
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..layers.modes import pad_layers

__all__ = ["routing_probe", "summarize_routing", "kernel_spread", "routing_diagnostics", "measure_routing"]


@contextlib.contextmanager
def routing_probe(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Within the block, every PAD layer of ``model`` appends its routing weights (float32, detached).

    Yields ``{layer_name: [weights per forward]}``. The probe is removed on exit.
    """
    layers = list(pad_layers(model))
    collected: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    for name, layer in layers:
        layer.__dict__["_routing_probe"] = collected[name]
    try:
        yield collected
    finally:
        for _, layer in layers:
            layer.__dict__.pop("_routing_probe", None)


def summarize_routing(weights: list[Tensor] | Tensor) -> dict[str, Any] | None:
    """``{entropy, entropy_normalized, pi_std, pi_mean}`` of routing weights ``[N, K]`` (``None`` if empty)."""
    pi = torch.cat(list(weights), 0) if isinstance(weights, list) else weights
    if pi.numel() == 0:
        return None
    pi = pi.double()
    k = pi.shape[1]
    p = pi / pi.sum(1, keepdim=True).clamp_min(1e-300)
    entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum(1).mean())
    std = float(pi.std(0, unbiased=False).mean()) if pi.shape[0] > 1 else 0.0
    return {
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(k) if k > 1 else 0.0,
        "pi_std": std,
        "pi_mean": [float(v) for v in pi.mean(0)],
    }


@torch.no_grad()
def kernel_spread(layer: nn.Module) -> float | None:
    """Mean pairwise cosine distance between the K live dynamic factors of ``layer``; ``None`` if none live."""
    _, lambda_d = layer.scales()
    parts = []
    for g in layer.mode_groups():
        live = g.mask.detach() > 0.5
        if bool(live.any()):
            parts.append((g.dynamic.detach().double() * float(lambda_d))[:, live])
    if not parts:
        return None
    w = torch.cat(parts, 1)
    k = w.shape[0]
    if k < 2:
        return 0.0
    norms = w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (w / norms) @ (w / norms).T
    off = cos[~torch.eye(k, dtype=torch.bool, device=cos.device)]
    return float((1.0 - off).mean())


def routing_diagnostics(model: nn.Module, collected: dict[str, list[Tensor]]) -> dict[str, dict[str, Any]]:
    """Per-layer ``summarize_routing`` of a probe's data plus ``kernel_spread``."""
    out = {}
    for name, layer in pad_layers(model):
        row = summarize_routing(collected.get(name, [])) or {}
        row["kernel_spread"] = kernel_spread(layer)
        out[name] = row
    return out


def mean_of(diagnostics: dict[str, dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the layers that have it (``None`` if none)."""
    values = [row[key] for row in diagnostics.values() if row.get(key) is not None]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def measure_routing(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """Mean routing weights ``{layer_name: [K]}`` over ``batches`` (eval mode, no gradients).

    ``batches`` yields inputs or ``(inputs, targets)`` pairs; ``forward(model, inputs)``
    defaults to ``model(inputs)`` (``model(**inputs)`` for a dict). The result can be
    passed as ``routing=`` to :func:`padnet.transforms.transitions.set_modes_`.
    """
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with routing_probe(model) as collected:
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else batch
                if forward is not None:
                    forward(model, inputs)
                elif isinstance(inputs, collections.abc.Mapping):
                    model(**inputs)
                else:
                    model(inputs)
    finally:
        for m, flag in was_training:
            m.training = flag
    out = {}
    for name, chunks in collected.items():
        if chunks:
            out[name] = torch.cat(chunks, 0).mean(0)
    if not out:
        raise ValueError("measure_routing: no PAD layer routed anything (empty batches?)")
    return out
