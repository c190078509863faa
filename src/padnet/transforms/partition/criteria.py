"""Mode-partition criteria: a registry of scoring functions.

A criterion scores every entry of one mode group; **higher = keep dynamic**::

    fn(group: ModeGroup, stats: GroupStats, layer: nn.Module, **kwargs) -> Tensor  # group.shape

``stats`` (:class:`GroupStats`) holds what :func:`padnet.transforms.partition.partition_`
accumulated for that group over the batches of the current iteration (under the
current mask): ``mask_grad`` = sum_b dL_b/dM (signed), ``dynamic_grad`` =
sum_b dL_b/dW_k (``[K, *shape]``), ``static_grad`` = sum_b dL_b/dW_s, the number
of batches, the scales and a seeded ``generator``. Statistics are collected only
for criteria registered with ``needs_data=True``, and only the ones listed in
``needs`` (default: all three).

Notation for entry j of a group with K factors: W_kj the dynamic factors, W_sj
the static copy, (lambda_s, lambda_d) the layer scales, g_kj = sum_b dL_b/dW_kj.
Dynamic-factor criteria are aggregated over k by the **mean**:

=====================  ===========================================================
``taylor`` (IMP)       s_j = | sum_b dL_b/dM_j |                   (data, re-scored)
``magnitude``          s_j = mean_k | lambda_d W_kj - lambda_s W_sj |  (data-free)
``random``             s_j ~ U(0, 1) from the call's seeded generator (data-free)
``set``                s_j = mean_k |W_kj|                               (data-free)
``mest``               s_j = mean_k ( |W_kj| + gamma |g_kj| ), gamma = 0.1   (data)
``snip``               s_j = mean_k | W_kj g_kj |                             (data)
``sensitivity``        s_j = mean_k |g_kj| / (|W_kj| + eps)                   (data)
``reversed_sensitivity``  s_j = mean_k |W_kj| / (|g_kj| + eps)                (data)
``taylor2``            s_j = mean_k (W_kj g_kj)^2                             (data)
=====================  ===========================================================

``eps = 1e-12``. ``gamma`` and ``eps`` are keyword arguments of the criterion
(``partition_(..., criterion_kwargs={"gamma": 0.01})``).

Besides ``needs_data`` / ``needs`` a criterion declares:

- ``monotone``: iterations never revive a static entry (currently dynamic
  entries always outrank static ones). ``taylor`` and ``magnitude`` are not
  monotone: |dL/dM_j| under the current mask is meaningful for static entries
  too (first-order loss change of flipping them back), so every iteration ranks
  all entries (as FORCE / docs/design.md). The Nowak et al. criteria are monotone:
  they score the dynamic factors, which are dead (zero gradient) once an entry
  is static, so they can only prune, as in dynamic sparse training.
- ``symmetric_zero``: the score measures the effect of a mode flip, which is
  exactly zero for a symmetric layer (every W_k == W_s, equal scales); the
  partitioner then zeroes that layer's scores instead of ranking float noise.
- ``stochastic``: scores are random; under ``torch.distributed`` they are
  broadcast from rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...layers.modes import ModeGroup
from ...registry import Registry

__all__ = [
    "CRITERIA",
    "STATS",
    "Criterion",
    "GroupStats",
    "get_criterion",
    "list_criteria",
    "register_criterion",
    "unregister_criterion",
]

STATS = ("mask_grad", "dynamic_grad", "static_grad")
MEST_GAMMA = 0.1
EPS = 1e-12


@dataclass
class GroupStats:
    """Statistics of one mode group for one scoring round.

    Attributes:
        layer_name: qualified name of the PAD layer.
        group_name: the mode group (``"weight"``, ``"bias"``, ``"in"``, ...).
        lambda_s, lambda_d: the layer's scales (detached 0-d tensors).
        mask_grad: ``[*shape]`` sum over batches of dL/dM (signed), or ``None``.
        dynamic_grad: ``[K, *shape]`` sum over batches of dL/dW_k, or ``None``
            (zero at static entries: those factors are dead).
        static_grad: ``[*shape]`` sum over batches of dL/dW_s, or ``None``.
        num_batches: batches summed (over all ranks under ``torch.distributed``);
            0 for data-free criteria.
        iteration: 1-based IMP iteration.
        generator: seeded CPU ``torch.Generator`` shared by the whole call.
    """

    layer_name: str
    group_name: str
    lambda_s: Tensor
    lambda_d: Tensor
    mask_grad: Tensor | None = None
    dynamic_grad: Tensor | None = None
    static_grad: Tensor | None = None
    num_batches: int = 0
    iteration: int = 1
    generator: torch.Generator | None = None


CriterionFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: the function plus what it needs and how it ranks."""

    name: str
    fn: CriterionFn
    needs_data: bool = False
    needs: tuple[str, ...] = ()
    monotone: bool = False
    symmetric_zero: bool = False
    stochastic: bool = False

    def __call__(self, group: ModeGroup, stats: GroupStats, layer: nn.Module, **kwargs: Any) -> Tensor:
        return self.fn(group, stats, layer, **kwargs)


CRITERIA: Registry[Criterion] = Registry("criterion", plural="criteria")


def _make_criterion(name: str, fn: CriterionFn, needs_data, needs, monotone, symmetric_zero, stochastic) -> Criterion:
    if not callable(fn):
        raise TypeError(f"criterion {name!r} must be callable, got {type(fn).__name__}")
    needs_data = bool(getattr(fn, "needs_data", False) if needs_data is None else needs_data)
    if needs is None:
        needs = getattr(fn, "needs", None)
    if needs is None:
        needs = STATS if needs_data else ()
    needs = tuple(needs)
    unknown = [n for n in needs if n not in STATS]
    if unknown:
        raise ValueError(f"criterion {name!r}: unknown statistics {unknown}; available: {list(STATS)}")
    if needs and not needs_data:
        needs_data = True
    if needs_data and not needs:
        needs = STATS
    return Criterion(
        name=name,
        fn=fn,
        needs_data=needs_data,
        needs=needs,
        monotone=bool(getattr(fn, "monotone", False) if monotone is None else monotone),
        symmetric_zero=bool(getattr(fn, "symmetric_zero", False) if symmetric_zero is None else symmetric_zero),
        stochastic=bool(getattr(fn, "stochastic", False) if stochastic is None else stochastic),
    )


def register_criterion(
    name: str,
    fn: CriterionFn | None = None,
    *,
    needs_data: bool | None = None,
    needs: tuple[str, ...] | list[str] | None = None,
    monotone: bool | None = None,
    symmetric_zero: bool | None = None,
    stochastic: bool | None = None,
    overwrite: bool = False,
):
    """Register ``fn(group, stats, layer, **kwargs) -> scores`` under ``name``.

    Usable as a function (``register_criterion("mine", fn)``) or a decorator
    (``@register_criterion("mine", needs_data=True)``); returns ``fn``. Flags not
    given are read from attributes of ``fn`` of the same name (``fn.needs_data``
    ...), else default to ``False``. ``needs`` lists the statistics to collect
    (subset of :data:`STATS`; default all when ``needs_data``). Registering an
    existing name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"criterion name must be a non-empty string, got {name!r}")

    def _add(f: CriterionFn) -> CriterionFn:
        current = CRITERIA.get(name, None)
        same_function = current is not None and current.fn is f  # re-registering updates the flags
        CRITERIA.register(name, _make_criterion(name, f, needs_data, needs, monotone, symmetric_zero, stochastic),
                          overwrite=overwrite or same_function)
        return f

    return _add if fn is None else _add(fn)


def unregister_criterion(name: str) -> None:
    """Remove a registered criterion (``KeyError`` listing the registered ones if absent)."""
    CRITERIA.unregister(name)


def list_criteria() -> list[str]:
    """Sorted names of all registered criteria."""
    return CRITERIA.names()


def get_criterion(criterion: str | Criterion | CriterionFn) -> Criterion:
    """Resolve a name, a :class:`Criterion` or a bare callable to a :class:`Criterion`.

    Unknown names raise :class:`~padnet.registry.UnknownNameError` (a
    ``ValueError`` and a ``KeyError``) listing the registered ones. A registered
    function resolves to its registration; any other callable is wrapped ad hoc,
    with flags read from its attributes.
    """
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str):
        return CRITERIA.get(criterion)
    if callable(criterion):
        for registered in CRITERIA.values():  # a registered function keeps its registered flags
            if registered.fn is criterion:
                return registered
        name = getattr(criterion, "__name__", type(criterion).__name__)
        return _make_criterion(name, criterion, None, None, None, None, None)
    raise ValueError(f"unknown criterion {criterion!r}; registered criteria: {', '.join(list_criteria())}")


# --------------------------------------------------------------------------------------------
# built-in criteria
# --------------------------------------------------------------------------------------------


def _f32(t: Tensor) -> Tensor:
    """Work in at least float32 (half-precision models score in float32)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _need(stats: GroupStats, what: str, criterion: str) -> Tensor:
    value = getattr(stats, what)
    if value is None:
        raise ValueError(f"criterion {criterion!r} needs {what}, which was not collected")
    return _f32(value)


@register_criterion("taylor", needs_data=True, needs=("mask_grad",), symmetric_zero=True)
def taylor(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """IMP (PAD-Net): ``s_j = | sum_b dL_b/dM_j |``.

    First-order estimate of the loss change when entry j flips mode;
    ``dL/dM_j = sum_b (lambda_d sum_k pi_bk W_kj - lambda_s W_sj) dL/dW_hat_bj``.
    Re-scored under the current mask at every iteration.
    """
    return _need(stats, "mask_grad", "taylor").abs()


@register_criterion("magnitude", symmetric_zero=True)
def magnitude(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """Data-free mode magnitude: ``s_j = mean_k | lambda_d W_kj - lambda_s W_sj |``.

    How much dynamic-ness entry j carries: the weight change of factor k when the
    entry becomes static. For any convex routing pi, the per-sample change
    ``| lambda_d sum_k pi_k W_kj - lambda_s W_sj |`` is at most ``max_k`` of these
    terms; the mean is its routing-agnostic (uniform pi) average. Zero for a
    symmetric (upcycled, noise-free) layer.
    """
    dyn = _f32(group.dynamic)
    sta = _f32(group.static)
    lambda_s, lambda_d = stats.lambda_s.to(dyn), stats.lambda_d.to(dyn)
    return (lambda_d * dyn - lambda_s * sta).abs().mean(0)


@register_criterion("random", stochastic=True, monotone=True)
def random(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """Random baseline: ``s_j ~ U(0, 1)`` from the call's seeded generator (``seed=``)."""
    scores = torch.rand(tuple(group.shape), generator=stats.generator, dtype=torch.float32)
    return scores.to(group.static.device)


@register_criterion("set", monotone=True)
def set_(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """SET (magnitude of the dynamic factors): ``s_j = mean_k |W_kj|``."""
    return _f32(group.dynamic).abs().mean(0)


@register_criterion("mest", needs_data=True, needs=("dynamic_grad",), monotone=True)
def mest(group: ModeGroup, stats: GroupStats, layer: nn.Module, gamma: float = MEST_GAMMA) -> Tensor:
    """MEST: ``s_j = mean_k ( |W_kj| + gamma |g_kj| )`` with ``gamma = 0.1`` by default."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "mest")
    return (w.abs() + gamma * g.abs()).mean(0)


@register_criterion("snip", needs_data=True, needs=("dynamic_grad",), monotone=True)
def snip(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """SNIP: ``s_j = mean_k | W_kj g_kj |``."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "snip")
    return (w * g).abs().mean(0)


@register_criterion("sensitivity", needs_data=True, needs=("dynamic_grad",), monotone=True)
def sensitivity(group: ModeGroup, stats: GroupStats, layer: nn.Module, eps: float = EPS) -> Tensor:
    """Sensitivity: ``s_j = mean_k |g_kj| / (|W_kj| + eps)``."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "sensitivity")
    return (g.abs() / (w.abs() + eps)).mean(0)


@register_criterion("reversed_sensitivity", needs_data=True, needs=("dynamic_grad",), monotone=True)
def reversed_sensitivity(group: ModeGroup, stats: GroupStats, layer: nn.Module, eps: float = EPS) -> Tensor:
    """Reversed sensitivity: ``s_j = mean_k |W_kj| / (|g_kj| + eps)``."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "reversed_sensitivity")
    return (w.abs() / (g.abs() + eps)).mean(0)


@register_criterion("taylor2", needs_data=True, needs=("dynamic_grad",), monotone=True)
def taylor2(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """Second-order Taylor (Fantastic Weights): ``s_j = mean_k (W_kj g_kj)^2``."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "taylor2")
    return (w * g).pow(2).mean(0)


# --------------------------------------------------------------------------------------------
# dynamic sparse training (Nowak et al. 2023, "Fantastic Weights and How to Find Them")
# --------------------------------------------------------------------------------------------
# The criteria above score the dynamic factors of a mode group (which entries stay dynamic).
# The ModeScheduler also prunes and regrows entries; it scores them through the same registry
# on an *effective view* of the group (padnet.transforms.sparsity.effective_view: K = 1,
# W_1j = the entry's effective weight w_j, g_1j = dL/dW_hat_j), where the formulas reduce to the
# seed paper's per-weight definitions (magnitude |w|, MEST |w| + gamma |g|, SNIP |w g|, ...).
# Growth criteria score candidates to grow: higher = grow first. A criterion function may set
# ``running_beta`` (float): the scheduler then feeds it exponential running averages of the
# gradient statistics (beta * old + (1 - beta) * new per scoring round) instead of the last round.

GRADSTEP_GAMMA = 1.0


@register_criterion("gradstep", needs_data=True, needs=("dynamic_grad",), monotone=True)
def gradstep(group: ModeGroup, stats: GroupStats, layer: nn.Module, gamma: float = GRADSTEP_GAMMA) -> Tensor:
    """GradStep: ``s_j = mean_k | W_kj - gamma g_kj |`` (magnitude after a virtual gradient step)."""
    w = _f32(group.dynamic)
    g = _need(stats, "dynamic_grad", "gradstep")
    return (w - gamma * g).abs().mean(0)


@register_criterion("set_signed", monotone=True)
def set_signed(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """SET as in the seed paper: prune the smallest positive and the near-zero negative weights equally.

    With ``w_j = mean_k W_kj``, positive and negative entries are ranked
    separately by ``|w_j|`` and the score is the rank within the entry's sign
    class, so removing the ``n`` lowest removes about ``n / 2`` from each side;
    exact zeros score -1 (removed first).
    """
    w = _f32(group.dynamic).mean(0).reshape(-1)
    scores = torch.full_like(w, -1.0)
    for sign in (w > 0, w < 0):
        idx = sign.nonzero().squeeze(1)
        if idx.numel():
            order = torch.argsort(w[idx].abs(), stable=True)
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(order.numel(), device=order.device)
            scores[idx] = ranks.to(scores.dtype)
    return scores.view(group.shape)


@register_criterion("gradient", needs_data=True, needs=("dynamic_grad",))
def gradient(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """Growth by gradient magnitude (RigL): ``s_j = mean_k |g_kj|``.

    For regrowth the scheduler's effective view gives ``|dL/dW_hat_j|`` (the
    dense gradient of a pruned entry); for promotion (static -> dynamic) it
    gives ``|dL/dM_j|``, PAD's first-order loss change of the mode flip.
    """
    return _need(stats, "dynamic_grad", "gradient").abs().mean(0)


def _momentum(group: ModeGroup, stats: GroupStats, layer: nn.Module) -> Tensor:
    """Growth by momentum (SNFS): ``|gradient|`` of the running average of the gradient statistics."""
    return _need(stats, "dynamic_grad", "momentum").abs().mean(0)


_momentum.running_beta = 0.9  # type: ignore[attr-defined]
register_criterion("momentum", _momentum, needs_data=True, needs=("dynamic_grad",))
