"""Partially dynamic mixture-of-experts feed-forward layer (DESIGN.md section 1).

:class:`MoEFeedForward` is a token-routed MoE FFN whose experts are the dynamic
factors of PAD-Net. Each of the two weight matrices (and, with ``bias=True``,
each bias vector) is a mode group: ``E`` expert copies, one static copy and a
mode mask shared by all experts. Expert ``e`` uses

    W_e_eff = lambda_d * M * W_e + lambda_s * (1 - M) * W_s

and the layer output for a token ``x`` is

    y(x) = sum_{e in top-k(x)} gate_e(x) * FFN_e(x),
    FFN_e(x) = act(x W_in_e_eff^T + b_in_e_eff) W_out_e_eff^T + b_out_e_eff.

A mask of all ones is the plain (fully dynamic) MoE, a mask of all zeros a
dense FFN with weights ``lambda_s * W_s`` (with normalised gates, which sum to
one, the routing then has no effect on the output).

Routing: ``probs = softmax(router(x))`` (computed in at least float32), the
``top_k`` experts with the largest probabilities are chosen, and their gates are
the chosen probabilities, renormalised to sum to one when ``normalize_gates``
(the default). With ``top_k=1`` renormalising makes every gate exactly 1, so the
router then learns only from the load-balancing loss; pass
``normalize_gates=False`` for the Switch Transformer behaviour (gate = raw
probability).

Dispatch (:func:`moe_dispatch`) is dropless: the (token, slot) assignments are
sorted by expert, and one loop over experts runs two contiguous GEMMs per
expert; results are combined with ``index_add`` weighted by the gates.

:class:`CompactMoEFeedForward` is the deploy form: static entries stored once,
dynamic entries ``E`` times, scales folded in, same outputs.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modes import (
    CompactLayerMixin, PackedModeGroup, PadLayerMixin, ScaleFactors, combine_factors, register_mask,
    register_routing_stats,
)

__all__ = [
    "MoEFeedForward",
    "CompactMoEFeedForward",
    "collect_aux_loss",
    "moe_dispatch",
    "DISPATCH_IMPLS",
    "route_tokens",
    "switch_load_balancing_loss",
    "resolve_activation",
    "SUPPORTED_ACTIVATIONS",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    # aliases used by Hugging Face configs (``hidden_act``)
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
}
SUPPORTED_ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)

# Mode-group name -> attribute of the packed group in the deploy form.
_PACKED_ATTRS = {"in": "in_proj", "out": "out_proj", "bias_in": "bias_in", "bias_out": "bias_out"}

WeightTuple = tuple[Tensor, "Tensor | None", Tensor, "Tensor | None"]


def resolve_activation(activation) -> tuple[Callable[[Tensor], Tensor], str]:
    """Return ``(callable, name)`` for an activation spec.

    ``activation`` is one of :data:`SUPPORTED_ACTIVATIONS` (case-insensitive), an
    ``nn.Module`` instance or class (e.g. a Hugging Face activation object), or
    any callable ``Tensor -> Tensor``.
    """
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; supported: {SUPPORTED_ACTIVATIONS} "
                "(or pass an nn.Module / callable)"
            )
        return _ACTIVATIONS[key](), key
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation(), activation.__name__
    if callable(activation):
        name = getattr(activation, "__name__", None) or type(activation).__name__
        return activation, name
    raise ValueError(
        f"unknown activation {activation!r}; supported: {SUPPORTED_ACTIVATIONS} (or pass an nn.Module / callable)"
    )


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_top_k(top_k, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts={num_experts}, got {top_k}")
    return top_k


# --------------------------------------------------------------------------------------------
# routing and dispatch (shared by the PAD layer, its deploy form and future backends)
# --------------------------------------------------------------------------------------------


def route_tokens(logits: Tensor, top_k: int, normalize_gates: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing.

    Args:
        logits: ``[N, E]`` router logits.
        top_k: experts per token.
        normalize_gates: renormalise the chosen probabilities to sum to one.

    Returns:
        ``(topk_idx [N, k] long, topk_gates [N, k] in logits.dtype, probs [N, E])``
        where ``probs`` is the softmax in ``promote(logits.dtype, float32)``.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(compute_dtype), dim=-1)
    topk_probs, topk_idx = torch.topk(probs, top_k, dim=-1)
    if normalize_gates:
        topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    return topk_idx, topk_probs.to(logits.dtype), probs


def switch_load_balancing_loss(probs: Tensor, counts: Tensor, top_k: int) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e = counts_e / (N * top_k)`` is the fraction of (token, slot) assignments
    routed to expert ``e`` (no gradient), ``P_e`` the mean router probability of
    ``e`` over the ``N`` tokens. Equals 1 for perfectly uniform routing. Returns
    0 for ``N = 0``.
    """
    n, num_experts = probs.shape
    if n == 0:
        return probs.new_zeros(())
    f = counts.to(probs.dtype) / float(n * top_k)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


DISPATCH_IMPLS = ("auto", "sorted", "dense")


def moe_dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_gates: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: Callable[[Tensor], Tensor],
    counts: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """Dropless dispatch of routed tokens through effective expert weights.

    Args:
        x: ``[N, H]`` tokens.
        topk_idx: ``[N, k]`` expert ids.
        topk_gates: ``[N, k]`` gate values.
        w_in: ``[E, I, H]`` effective input projections; ``b_in``: ``[E, I]`` or None.
        w_out: ``[E, H, I]`` effective output projections; ``b_out``: ``[E, H]`` or None.
        activation: elementwise callable.
        counts: optional precomputed ``bincount(topk_idx, minlength=E)``.
        impl: ``"sorted"`` (default eager path), ``"dense"`` (export path) or
            ``"auto"`` (``"dense"`` while exporting / tracing, else ``"sorted"``).

    Returns:
        ``[N, H]``: ``sum_j gate[n, j] * FFN_{idx[n, j]}(x[n])``.

    ``"sorted"``: the (token, slot) pairs are stably sorted by expert id; each
    expert runs two GEMMs (bias fused via ``addmm``) on its contiguous slice --
    one Python loop over experts (one host sync for the counts), never over
    tokens. Slot outputs are then un-permuted with one gather and combined per
    token as ``sum_j gate * y`` in at least float32 (no scatter-add). Without
    autograd the expert outputs are written straight into one preallocated
    buffer. (``torch._grouped_mm`` exists on CPU in torch 2.13 but measured
    slower here, and it has no float64 or bias support; see docs/benchmarks.md.)

    ``"dense"``: every expert processes every token and the outputs are gated
    with the top-k mask (zero gates elsewhere): ``E / k`` times the expert FLOPs
    but no data-dependent shapes, so it exports (torch.export, ONNX) with a
    dynamic token axis. Same numbers up to float rounding.
    """
    if impl not in DISPATCH_IMPLS:
        raise ValueError(f"unknown MoE dispatch impl {impl!r}; expected one of {DISPATCH_IMPLS}")
    if impl == "auto":
        from .conv_functional import is_exporting

        impl = "dense" if is_exporting() else "sorted"
    if impl == "dense":
        return _dense_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation)
    n, h = x.shape
    num_experts = w_in.shape[0]
    k = topk_idx.shape[1]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    if n == 0:
        return torch.zeros(n, w_out.shape[1], device=x.device, dtype=x.dtype)
    flat_expert = topk_idx.reshape(-1)
    if counts is None:
        counts = torch.bincount(flat_expert, minlength=num_experts)
    order = torch.argsort(flat_expert, stable=True)
    x_sorted = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, topk_gates, w_in, b_in, w_out, b_out)
    )
    out_features = w_out.shape[1]
    y_sorted = None if track else x.new_empty(n * k, out_features)
    pieces = []
    start = 0
    for e, c in enumerate(counts.tolist()):  # one host sync; loop over experts only
        if c == 0:
            continue
        xe = x_sorted[start : start + c]
        hidden = activation(F.linear(xe, w_in[e], None if b_in is None else b_in[e]))
        if track:
            pieces.append(F.linear(hidden, w_out[e], None if b_out is None else b_out[e]))
        elif b_out is None:
            torch.mm(hidden, w_out[e].t(), out=y_sorted[start : start + c])
        else:
            torch.addmm(b_out[e], hidden, w_out[e].t(), out=y_sorted[start : start + c])
        start += c
    if track:
        y_sorted = torch.cat(pieces, dim=0)
    # un-permute: slot j of token t sits at position inverse[t * k + j]
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    y_slots = y_sorted.index_select(0, inverse).view(n, k, out_features)
    gates = topk_gates.to(acc_dtype).unsqueeze(1)  # [N, 1, k]
    if y_slots.dtype == acc_dtype:
        out = torch.bmm(gates, y_slots).squeeze(1)
    else:
        out = torch.bmm(gates, y_slots.to(acc_dtype)).squeeze(1)
    return out.to(x.dtype)


def _dense_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation) -> Tensor:
    """All experts on all tokens, gated by the (sparse) top-k gates: export-friendly, E/k x FLOPs."""
    num_experts = w_in.shape[0]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    gates = torch.zeros(x.shape[0], num_experts, device=x.device, dtype=acc_dtype)
    gates = gates.scatter(1, topk_idx, topk_gates.to(acc_dtype))  # [N, E], zero for unchosen experts
    hidden = torch.matmul(x.unsqueeze(0), w_in.transpose(1, 2))  # [E, N, I]
    if b_in is not None:
        hidden = hidden + b_in.unsqueeze(1)
    hidden = activation(hidden)
    y = torch.matmul(hidden, w_out.transpose(1, 2))  # [E, N, H]
    if b_out is not None:
        y = y + b_out.unsqueeze(1)
    out = torch.einsum("ne,enh->nh", gates, y.to(acc_dtype))
    return out.to(x.dtype)


class _MoERouting:
    """Routing, load-balancing bookkeeping and dispatch shared by both MoE forms.

    Needs ``hidden_size``, ``num_experts``, ``top_k``, ``normalize_gates``,
    ``aux_loss_coef``, ``router`` and ``act`` on the instance.
    """

    hidden_size: int
    num_experts: int
    top_k: int
    normalize_gates: bool
    aux_loss_coef: float
    router: nn.Linear
    act: Callable[[Tensor], Tensor]

    def _init_routing_state(self, device=None) -> None:
        self.aux_loss = torch.zeros((), device=device)
        self.last_expert_counts = torch.zeros(self.num_experts, dtype=torch.long, device=device)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape [..., {self.hidden_size}] "
                f"(last dim = hidden_size={self.hidden_size}), got shape {tuple(x.shape)}"
            )

    def route(self, x_flat: Tensor) -> tuple[Tensor, Tensor]:
        """Route ``[N, H]`` tokens; sets ``aux_loss`` and ``last_expert_counts``.

        Returns ``(topk_idx [N, k], topk_gates [N, k])``.
        """
        logits = self.router(x_flat)
        topk_idx, topk_gates, probs = route_tokens(logits, self.top_k, self.normalize_gates)
        counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)
        self.aux_loss = self.aux_loss_coef * switch_load_balancing_loss(probs, counts, self.top_k)
        self.last_expert_counts = counts.detach()
        self._observe_routing(topk_idx, topk_gates)
        return topk_idx, topk_gates

    def _observe_routing(self, topk_idx: Tensor, topk_gates: Tensor) -> None:
        """Running mean gate per expert (PAD layer, training) and the diagnostics probe.

        The per-token gate matrix ``[N, E]`` is zero for experts a token was not routed to.
        """
        stats = self.training and hasattr(self, "update_routing_stats_")
        probe = self.__dict__.get("_routing_probe")
        if (not stats and probe is None) or topk_idx.shape[0] == 0:
            return
        from .conv_functional import is_exporting

        if is_exporting():
            return
        with torch.no_grad():
            dense = torch.zeros(topk_idx.shape[0], self.num_experts, device=topk_gates.device, dtype=torch.float32)
            dense.scatter_add_(1, topk_idx, topk_gates.detach().float())
            if stats:
                self.update_routing_stats_(dense.mean(0))
            if probe is not None:
                probe.append(dense)

    def _moe_forward(self, x: Tensor, weights: Callable[[], WeightTuple]) -> Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, self.hidden_size)
        topk_idx, topk_gates = self.route(x_flat)
        w_in, b_in, w_out, b_out = weights()
        out = moe_dispatch(x_flat, topk_idx, topk_gates, w_in, b_in, w_out, b_out, self.act,
                           counts=self.last_expert_counts)
        return out.reshape(*lead, self.hidden_size)

    def __getstate__(self):
        # aux_loss usually carries a graph; non-leaf tensors cannot be deep-copied.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__  # type: ignore[misc]
        state = dict(state)
        if isinstance(state.get("aux_loss"), Tensor):
            state["aux_loss"] = state["aux_loss"].detach()
        return state


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every MoE layer of ``model`` (a 0-d zero if none).

    Each ``aux_loss`` is already multiplied by its layer's ``aux_loss_coef`` and
    reflects the layer's most recent forward; add the result to the task loss.
    """
    total = None
    for module in model.modules():
        if isinstance(module, _MoERouting):
            aux = module.aux_loss
            total = aux if total is None else total + aux.to(total.device)
    if total is None:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


# --------------------------------------------------------------------------------------------
# PAD layer
# --------------------------------------------------------------------------------------------


class MoEFeedForward(_MoERouting, PadLayerMixin, nn.Module):
    """Partially dynamic top-k MoE feed-forward layer.

    Args:
        hidden_size: model width ``H`` (input and output features).
        intermediate_size: expert width ``I``.
        num_experts: ``E >= 1``.
        top_k: experts per token, ``1 <= top_k <= E``.
        activation: one of :data:`SUPPORTED_ACTIVATIONS`, an ``nn.Module`` or a callable.
        bias: expert / static biases for both projections.
        scale: ``"learned"`` (one phi, lambda_d = 2 sigmoid(phi)) or ``"none"``.
        aux_loss_coef: multiplier of the Switch load-balancing loss stored in ``aux_loss``.
        normalize_gates: renormalise the top-k probabilities to sum to one.

    Attributes:
        experts_in ``[E, I, H]``, experts_out ``[E, H, I]``, static_in ``[I, H]``,
        static_out ``[H, I]``; mode_mask_in ``[I, H]`` / mode_mask_out ``[H, I]``
        float buffers (1 = dynamic, all ones at construction); with ``bias``:
        experts_bias_in ``[E, I]``, experts_bias_out ``[E, H]``, static_bias_in
        ``[I]``, static_bias_out ``[H]``, mode_mask_bias_in ``[I]``,
        mode_mask_bias_out ``[H]`` (else these are ``None``); ``router``
        (``nn.Linear(H, E, bias=False)``); ``scale`` (:class:`ScaleFactors`);
        ``act`` (the activation callable) and ``activation`` (its name);
        ``aux_loss`` (0-d tensor, set by every forward, in at least float32) and
        ``last_expert_counts`` (long ``[E]``, detached).
    """

    _mode_group_specs = (
        ("in", "experts_in", "static_in", "mode_mask_in", 0, 2),
        ("out", "experts_out", "static_out", "mode_mask_out", 0, 2),
        ("bias_in", "experts_bias_in", "static_bias_in", "mode_mask_bias_in", 0, 1),
        ("bias_out", "experts_bias_out", "static_bias_out", "mode_mask_bias_out", 0, 1),
    )

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int = 4,
        top_k: int = 2,
        activation="gelu",
        bias: bool = True,
        scale: str = "learned",
        aux_loss_coef: float = 0.01,
        device=None,
        dtype=None,
        normalize_gates: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = _check_positive("hidden_size", hidden_size)
        self.intermediate_size = _check_positive("intermediate_size", intermediate_size)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int):
            raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.top_k = _check_top_k(top_k, num_experts)
        aux_loss_coef = float(aux_loss_coef)
        if not aux_loss_coef >= 0.0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {aux_loss_coef}")
        self.aux_loss_coef = aux_loss_coef
        self.normalize_gates = bool(normalize_gates)
        self.act, self.activation = resolve_activation(activation)

        h, i, e = hidden_size, intermediate_size, num_experts
        fk = {"device": device, "dtype": dtype}
        self.experts_in = nn.Parameter(torch.empty(e, i, h, **fk))
        self.experts_out = nn.Parameter(torch.empty(e, h, i, **fk))
        self.static_in = nn.Parameter(torch.empty(i, h, **fk))
        self.static_out = nn.Parameter(torch.empty(h, i, **fk))
        register_mask(self, "mode_mask_in", (i, h), device=device, dtype=dtype)
        register_mask(self, "mode_mask_out", (h, i), device=device, dtype=dtype)
        if bias:
            self.experts_bias_in = nn.Parameter(torch.empty(e, i, **fk))
            self.experts_bias_out = nn.Parameter(torch.empty(e, h, **fk))
            self.static_bias_in = nn.Parameter(torch.empty(i, **fk))
            self.static_bias_out = nn.Parameter(torch.empty(h, **fk))
            register_mask(self, "mode_mask_bias_in", (i,), device=device, dtype=dtype)
            register_mask(self, "mode_mask_bias_out", (h,), device=device, dtype=dtype)
        else:
            for name in ("experts_bias_in", "experts_bias_out", "static_bias_in", "static_bias_out"):
                self.register_parameter(name, None)
            for name in ("mode_mask_bias_in", "mode_mask_bias_out"):
                self.register_buffer(name, None)
        self.router = nn.Linear(h, e, bias=False, **fk)
        self.scale = ScaleFactors(scale, **fk)
        register_routing_stats(self, e, 1.0 / e, device=device)
        self.reset_parameters()
        self._init_routing_state(device)

    #: every expert holds the same value at a static entry: static -> dynamic is exact for any
    #: gates, and dynamic -> static folds the experts with their normalised mean gate weights
    routing_sums_to_one = True
    routing_normalize_mix = True

    @property
    def has_bias(self) -> bool:
        return self.experts_bias_in is not None

    def reset_parameters(self) -> None:
        """nn.Linear's default init for every expert (independently), the static copy and the router."""
        with torch.no_grad():
            for e in range(self.num_experts):
                _linear_init_(self.experts_in[e], None if self.experts_bias_in is None else self.experts_bias_in[e])
                _linear_init_(self.experts_out[e], None if self.experts_bias_out is None else self.experts_bias_out[e])
            _linear_init_(self.static_in, self.static_bias_in)
            _linear_init_(self.static_out, self.static_bias_out)
        self.router.reset_parameters()

    def effective_weights(self) -> WeightTuple:
        """``(w_in [E, I, H], b_in [E, I] | None, w_out [E, H, I], b_out [E, H] | None)``.

        Every expert's effective weight ``lambda_d * M * W_e + lambda_s * (1 - M) * W_s``,
        computed once with :func:`modes.combine_factors` (dead entries get zero gradient).
        """
        lambda_s, lambda_d = self.scales()

        def combined(dyn: Tensor | None, sta: Tensor | None, mask: Tensor | None,
                     live: Tensor | None = None) -> Tensor | None:
            if dyn is None:
                return None
            d, s = combine_factors(dyn, sta, mask.to(dyn.dtype), lambda_s, lambda_d,
                                   None if live is None else live.to(dyn.dtype))
            return d + s

        # live masks (pruned entries) are registered only after pruning
        return (
            combined(self.experts_in, self.static_in, self.mode_mask_in, getattr(self, "live_mask_in", None)),
            combined(self.experts_bias_in, self.static_bias_in, self.mode_mask_bias_in,
                     getattr(self, "live_mask_bias_in", None)),
            combined(self.experts_out, self.static_out, self.mode_mask_out, getattr(self, "live_mask_out", None)),
            combined(self.experts_bias_out, self.static_bias_out, self.mode_mask_bias_out,
                     getattr(self, "live_mask_bias_out", None)),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., H] -> [..., H]``; also sets ``aux_loss`` and ``last_expert_counts``."""
        return self._moe_forward(x, self.effective_weights)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
            f"bias={self.has_bias}, normalize_gates={self.normalize_gates}, aux_loss_coef={self.aux_loss_coef}"
        )

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        fc_in: nn.Linear,
        fc_out: nn.Linear,
        num_experts: int = 4,
        top_k: int = 2,
        activation="gelu",
        init: str = "upcycle",
        noise_std: float = 0.01,
        importance: Tensor | None = None,
        expert_size: int | None = None,
        num_shared: int | None = None,
        router_init_std: float = 0.02,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> "MoEFeedForward":
        """Build an MoE layer from a dense FFN ``act(fc_in(x)) -> fc_out``.

        ``fc_in`` is ``Linear(H, I)``, ``fc_out`` is ``Linear(I, H)``; the result
        has the dtype and device of ``fc_in`` and a bias iff either layer has one
        (a missing one is zero). The mask starts all ones; ``kwargs`` go to the
        constructor (``scale``, ``aux_loss_coef``, ``normalize_gates``).
        The router weight is drawn from ``N(0, router_init_std^2)``.

        ``init="upcycle"`` (sparse upcycling): every expert and the static copy
        start as the dense weights, and each expert tensor ``T`` gets
        ``noise_std * T.std() * randn`` added (biases whose std is 0 use the
        std of their weight matrix) to break the symmetry. With
        ``noise_std=0`` all experts equal the dense FFN, so the MoE reproduces
        it exactly for any routing (gates sum to one with
        ``normalize_gates=True``) -- but that is the IMP symmetry trap
        (DESIGN.md 1): all mode-partition scores are zero.

        ``init="split"`` (MoEBERT-style importance split; intermediate size
        becomes ``expert_size``): neurons are ranked by ``importance`` (``[I]``,
        e.g. accumulated ``|activation * grad|``; default proxy
        ``||W_in[i, :]||_2 * ||W_out[:, i]||_2``), ties by index.
        ``expert_size`` defaults to ``ceil(I / E)``. The ``num_shared`` most
        important neurons go to every expert; by default the smallest number
        that lets the ``E * expert_size`` slots cover all ``I`` neurons,
        ``ceil((E * expert_size - I) / (E - 1))`` clipped to
        ``[0, expert_size]`` (``expert_size`` when ``E = 1``). The remaining
        neurons, in decreasing importance, are dealt round-robin (the j-th goes
        to expert ``j % E``) until each expert is full; whatever is left (the
        least important) is dropped. Each expert lists its shared neurons first
        (importance order), then its own. The static copy holds the
        ``expert_size`` most important neurons in importance order, so row ``r``
        of the static copy is the same neuron as row ``r`` of every expert for
        ``r < num_shared``. The output bias is copied whole into every expert
        and the static copy. ``noise_std`` noise is added to the experts as for
        upcycling. The chosen indices are kept in ``split_indices`` (long
        ``[E, expert_size]``, original neuron ids) and ``num_shared``.
        """
        if not isinstance(fc_in, nn.Linear) or not isinstance(fc_out, nn.Linear):
            raise TypeError("from_dense expects two nn.Linear layers (fc_in: H -> I, fc_out: I -> H)")
        i_dense, h = fc_in.weight.shape
        if tuple(fc_out.weight.shape) != (h, i_dense):
            raise ValueError(
                f"fc_out must be Linear({i_dense}, {h}) to match fc_in Linear({h}, {i_dense}); "
                f"got weight shape {tuple(fc_out.weight.shape)} (expected {(h, i_dense)})"
            )
        if isinstance(num_experts, bool) or not isinstance(num_experts, int):
            raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if init not in ("upcycle", "split"):
            raise ValueError(f"unknown init {init!r}; expected 'upcycle' or 'split'")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        device, dtype = fc_in.weight.device, fc_in.weight.dtype
        with torch.no_grad():
            w_in = fc_in.weight.detach().to(device=device, dtype=dtype)
            w_out = fc_out.weight.detach().to(device=device, dtype=dtype)
            has_bias = fc_in.bias is not None or fc_out.bias is not None
            b_in = fc_in.bias.detach().to(w_in) if fc_in.bias is not None else w_in.new_zeros(i_dense)
            b_out = fc_out.bias.detach().to(w_in) if fc_out.bias is not None else w_in.new_zeros(h)

        split_indices = None
        if init == "upcycle":
            if importance is not None:
                raise ValueError("importance is only used with init='split'")
            if expert_size is not None and expert_size != i_dense:
                raise ValueError(f"expert_size is only used with init='split' (upcycling keeps I={i_dense})")
            if num_shared is not None:
                raise ValueError("num_shared is only used with init='split'")
            size = i_dense
            idx = torch.arange(i_dense).expand(num_experts, -1)
            static_idx = torch.arange(i_dense)
        else:
            size = math.ceil(i_dense / num_experts) if expert_size is None else expert_size
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= i_dense:
                raise ValueError(f"expert_size must be an int in [1, {i_dense}], got {expert_size}")
            if importance is None:
                importance = w_in.float().norm(dim=1) * w_out.float().norm(dim=0)
            importance = torch.as_tensor(importance).detach()
            if importance.shape != (i_dense,):
                raise ValueError(f"importance must have shape [{i_dense}], got {tuple(importance.shape)}")
            idx, static_idx, num_shared = _split_assignment(importance, num_experts, size, num_shared)
            split_indices = idx

        moe = cls(h, size, num_experts=num_experts, top_k=top_k, activation=activation, bias=has_bias,
                  device=device, dtype=dtype, **kwargs)
        static_idx = static_idx.to(device)
        with torch.no_grad():
            moe.static_in.copy_(w_in[static_idx])
            moe.static_out.copy_(w_out[:, static_idx])
            if has_bias:
                moe.static_bias_in.copy_(b_in[static_idx])
                moe.static_bias_out.copy_(b_out)
            for e in range(num_experts):
                sel = idx[e].to(device)
                _copy_with_noise(moe.experts_in[e], w_in[sel], noise_std, None, generator)
                _copy_with_noise(moe.experts_out[e], w_out[:, sel], noise_std, None, generator)
                if has_bias:
                    _copy_with_noise(moe.experts_bias_in[e], b_in[sel], noise_std, w_in, generator)
                    _copy_with_noise(moe.experts_bias_out[e], b_out, noise_std, w_out, generator)
            moe.router.weight.normal_(0.0, router_init_std, generator=generator)
        if split_indices is not None:
            moe.split_indices = split_indices
            moe.num_shared = num_shared
        return moe


def _linear_init_(weight: Tensor, bias: Tensor | None) -> None:
    """In-place nn.Linear default init of a ``[out, in]`` weight and ``[out]`` bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def _copy_with_noise(dst: Tensor, src: Tensor, noise_std: float, fallback: Tensor | None, generator) -> None:
    """``dst = src + noise_std * std(src) * randn`` (std of ``fallback`` if ``src``'s is 0)."""
    if noise_std == 0:
        dst.copy_(src)
        return
    src32 = src.float()
    std = float(src32.std()) if src32.numel() > 1 else 0.0
    if std == 0.0 and fallback is not None and fallback.numel() > 1:
        std = float(fallback.float().std())
    noise = torch.randn(src.shape, generator=generator, device=src.device, dtype=torch.float32)
    dst.copy_(src32 + noise_std * std * noise)


def _split_assignment(
    importance: Tensor, num_experts: int, expert_size: int, num_shared: int | None
) -> tuple[Tensor, Tensor, int]:
    """Neuron ids per expert ``[E, expert_size]``, static ids ``[expert_size]``, and num_shared."""
    i_dense = importance.numel()
    # Descending importance, ties broken by lower index (stable sort of the negated scores).
    order = torch.argsort(-importance.double().cpu(), stable=True)
    if num_shared is None:
        if num_experts == 1:
            num_shared = expert_size
        else:
            need = num_experts * expert_size - i_dense
            num_shared = max(0, -(-need // (num_experts - 1)))
            num_shared = min(num_shared, expert_size)
    elif isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 <= num_shared <= expert_size:
        raise ValueError(f"num_shared must be an int in [0, expert_size={expert_size}], got {num_shared}")
    shared = order[:num_shared]
    rest = order[num_shared:]
    per_expert = expert_size - num_shared
    take = min(rest.numel(), num_experts * per_expert)
    if take < num_experts * per_expert:
        raise ValueError(
            f"cannot fill {num_experts} experts of size {expert_size} with {num_shared} shared neurons "
            f"from {i_dense} neurons; raise num_shared"
        )
    rest = rest[:take]
    rows = []
    for e in range(num_experts):
        own = rest[e::num_experts]
        rows.append(torch.cat([shared, own]))
    idx = torch.stack(rows)
    return idx, order[:expert_size].clone(), num_shared


# --------------------------------------------------------------------------------------------
# deploy form
# --------------------------------------------------------------------------------------------


class CompactMoEFeedForward(_MoERouting, CompactLayerMixin, nn.Module):
    """Deploy form of :class:`MoEFeedForward`: live entries only, scales folded in.

    Holds the router, the activation and one :class:`PackedModeGroup` per mode
    group (``in_proj``, ``out_proj``, and ``bias_in`` / ``bias_out`` when the
    source layer has biases, else ``None``). Static entries are stored once,
    dynamic entries ``E`` times. Outputs, ``aux_loss`` and
    ``last_expert_counts`` match the source layer.

    Build it with :meth:`from_layer`; the constructor makes zero-valued packed
    groups from ``masks`` (group name -> mask: ``"in"`` ``[I, H]``, ``"out"``
    ``[H, I]``, optional ``"bias_in"`` ``[I]`` and ``"bias_out"`` ``[H]``), e.g.
    to load a saved deploy checkpoint.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        masks: Mapping[str, Tensor],
        activation="gelu",
        normalize_gates: bool = True,
        aux_loss_coef: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.hidden_size = _check_positive("hidden_size", hidden_size)
        self.intermediate_size = _check_positive("intermediate_size", intermediate_size)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.top_k = _check_top_k(top_k, num_experts)
        self.normalize_gates = bool(normalize_gates)
        self.aux_loss_coef = float(aux_loss_coef)
        self.act, self.activation = resolve_activation(activation)
        h, i = hidden_size, intermediate_size
        shapes = {"in": (i, h), "out": (h, i), "bias_in": (i,), "bias_out": (h,)}
        unknown = set(masks) - set(shapes)
        if unknown or not {"in", "out"} <= set(masks) or (("bias_in" in masks) != ("bias_out" in masks)):
            raise ValueError(f"masks must have keys 'in', 'out' and optionally both 'bias_in', 'bias_out'; "
                             f"got {sorted(masks)}")
        for name, attr in _PACKED_ATTRS.items():
            if name not in masks:
                setattr(self, attr, None)
                continue
            mask = masks[name]
            if tuple(mask.shape) != shapes[name]:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {shapes[name]}")
            setattr(self, attr, PackedModeGroup(mask.detach() > 0.5, num_experts, device=device, dtype=dtype))
        self.router = nn.Linear(h, num_experts, bias=False, device=device, dtype=dtype)
        self._init_routing_state(device)

    @classmethod
    def from_layer(cls, moe: MoEFeedForward) -> "CompactMoEFeedForward":
        if not isinstance(moe, MoEFeedForward):
            raise TypeError(f"from_layer expects a MoEFeedForward, got {type(moe).__name__}")
        groups = {g.name: g for g in moe.mode_groups()}
        compact = cls(
            moe.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
            masks={name: g.mask for name, g in groups.items()},
            activation=copy.deepcopy(moe.act) if isinstance(moe.act, nn.Module) else moe.act,
            normalize_gates=moe.normalize_gates, aux_loss_coef=moe.aux_loss_coef,
            device=moe.static_in.device, dtype=moe.static_in.dtype,
        )
        compact.activation = moe.activation
        with torch.no_grad():
            lambda_s, lambda_d = (s.detach() for s in moe.scales())
            for name, g in groups.items():
                setattr(compact, _PACKED_ATTRS[name], PackedModeGroup.from_group(g, lambda_s, lambda_d))
        compact.router = copy.deepcopy(moe.router)
        compact.train(moe.training)
        return compact

    @property
    def has_bias(self) -> bool:
        return self.bias_in is not None

    def _expert_weights(self, packed: PackedModeGroup | None) -> Tensor | None:
        if packed is None:
            return None
        shape = packed.mask.shape
        if packed.all_dynamic:
            return packed.dynamic_values.reshape(self.num_experts, *shape)
        if packed.all_static:
            return packed.static_values.reshape(shape).expand(self.num_experts, *shape)
        dyn, sta = packed.materialize()
        return dyn + sta

    def effective_weights(self) -> WeightTuple:
        """Same as :meth:`MoEFeedForward.effective_weights`, rebuilt from the packed values."""
        return (
            self._expert_weights(self.in_proj),
            self._expert_weights(self.bias_in),
            self._expert_weights(self.out_proj),
            self._expert_weights(self.bias_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._moe_forward(x, self.effective_weights)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
            f"normalize_gates={self.normalize_gates}"
        )
