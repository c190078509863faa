"""Partially dynamic mixture-of-experts feed-forward layer (docs/design.md section 1).

:class:`MoEFeedForward` is a token-routed MoE FFN whose experts are the dynamic
factors of PAD-Net. Each weight matrix (and, with ``bias=True``, each bias
vector) is a mode group: ``E`` expert copies, one static copy and a mode mask
shared by all experts. Expert ``e`` uses

    W_e_eff = lambda_d * M * W_e + lambda_s * (1 - M) * W_s

and the layer output for a token ``x`` is

    y(x) = sum_{e in top-k(x)} gate_e(x) * FFN_e(x),
    FFN_e(x) = act(x W_in_e_eff^T + b_in_e_eff) W_out_e_eff^T + b_out_e_eff          (plain)
    FFN_e(x) = (act(x W_gate_e_eff^T + b_gate) * (x W_in_e_eff^T + b_in)) W_out_e_eff^T + b_out   (gated)

With ``gated=True`` (SwiGLU / GeGLU experts, as in LLaMA or T5 v1.1) ``W_in`` is
the *up* projection and a third mode group ``"gate"`` holds the gate
projection. A mask of all ones is the plain (fully dynamic) MoE, a mask of all
zeros a dense FFN with weights ``lambda_s * W_s`` (with normalised gates, which
sum to one, the routing then has no effect on the output).

Routing (see :class:`_MoERouting` and docs/moe.md): softmax top-k (default),
noisy top-k (official PAD-Net MoE code), sigmoid scores with top-k
renormalisation; balancing by the Switch loss, the cv^2 loss or none, an
optional router z-loss, and optional auxiliary-loss-free bias balancing. The
gates are the chosen scores, renormalised to sum to one when
``normalize_gates`` (the default). With ``top_k=1`` renormalising makes every
gate exactly 1, so the router then learns only from the balancing loss; pass
``normalize_gates=False`` for the Switch Transformer behaviour.

Dispatch (:mod:`padnet.ops.moe_dispatch`) is dropless: the (token, slot)
assignments are sorted by expert and one loop over experts runs contiguous
GEMMs per expert.

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

from ..ops.moe_dispatch import DISPATCH_IMPLS, moe_dispatch
from ..ops.moe_routing import (
    cv2_balancing_loss,
    expert_distribution,
    noisy_top_k_load,
    route_tokens,
    router_z_loss,
    sign_bias_update,
    switch_load_balancing_loss,
)
from ..ops.exporting import is_exporting
from .modes import (
    CompactLayerMixin, PackedModeGroup, PadLayerMixin, ScaleFactors, cached_derived, live_mask_attr, register_mask,
    register_routing_stats,
)

__all__ = [
    "MoEFeedForward",
    "CompactMoEFeedForward",
    "collect_aux_loss",
    "update_expert_biases",
    "expert_load_stats",
    "summarize_expert_load",
    "moe_dispatch",
    "DISPATCH_IMPLS",
    "ROUTINGS",
    "BALANCE_LOSSES",
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
_PACKED_ATTRS = {
    "in": "in_proj", "gate": "gate_proj", "out": "out_proj",
    "bias_in": "bias_in", "bias_gate": "bias_gate", "bias_out": "bias_out",
}

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
# routing and dispatch (shared by the PAD layer and its deploy form)
# --------------------------------------------------------------------------------------------

ROUTINGS = ("softmax", "noisy", "sigmoid")
BALANCE_LOSSES = ("switch", "cv2", "none")
NOISE_EPSILON = 1e-2  # noisy top-k: noise std = softplus(x W_noise) + NOISE_EPSILON


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return value


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class _MoERouting:
    """Router, routing variants, balancing losses, load statistics and dispatch of both MoE forms.

    Routing configuration (constructor arguments of both forms):

    - ``routing``: ``"softmax"`` (top-k of ``softmax(x W_r)``), ``"noisy"``
      (noisy top-k of the official PAD-Net MoE code / Shazeer et al. 2017: in
      training the logits get ``randn * (softplus(x W_noise) + 0.01)`` added,
      ``W_noise`` learned and zero-initialised; softmax over the selected noisy
      logits; no noise in eval) or ``"sigmoid"`` (scores ``sigmoid(x W_r)``,
      the top-k renormalised when ``normalize_gates``).
    - ``balance_loss``: ``"switch"`` (``E * sum_e f_e P_e``), ``"cv2"``
      (``cv^2(importance) + cv^2(load)``, the official code's loss) or
      ``"none"``; scaled by ``aux_loss_coef``.
    - ``z_loss_coef``: weight of the router z-loss ``mean (logsumexp z)^2``.
    - ``bias_balancing``: auxiliary-loss-free balancing: a per-expert buffer
      ``expert_bias`` ``[E]`` added to the scores for the top-k selection only;
      :meth:`update_expert_bias` (call it after each optimizer step, e.g. via
      :func:`update_expert_biases`) does ``b_e += bias_update_rate * sign(mean
      load - load_e)`` with the loads counted in training forwards since the
      last update.

    Every forward sets ``aux_loss`` (0-d, with gradient), ``aux_losses``
    (detached parts: ``"balance"``, ``"z"``) and ``last_expert_counts`` (long
    ``[E]``: (token, slot) assignments per expert).
    """

    hidden_size: int
    num_experts: int
    top_k: int
    normalize_gates: bool
    aux_loss_coef: float
    router: nn.Linear
    act: Callable[[Tensor], Tensor]

    def _init_routing(
        self,
        routing: str,
        balance_loss: str,
        aux_loss_coef: float,
        z_loss_coef: float,
        bias_balancing: bool,
        bias_update_rate: float,
        device=None,
        dtype=None,
    ) -> None:
        """Validate the routing options and create ``router`` (+ ``router_noise``, ``expert_bias``)."""
        self.routing = _check_choice("routing", routing, ROUTINGS)
        self.balance_loss = _check_choice("balance_loss", balance_loss, BALANCE_LOSSES)
        self.aux_loss_coef = _check_nonneg("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = _check_nonneg("z_loss_coef", z_loss_coef)
        self.bias_update_rate = _check_nonneg("bias_update_rate (gamma)", bias_update_rate)
        self.bias_balancing = bool(bias_balancing)
        h, e = self.hidden_size, self.num_experts
        self.router = nn.Linear(h, e, bias=False, device=device, dtype=dtype)
        if routing == "noisy":
            self.router_noise = nn.Linear(h, e, bias=False, device=device, dtype=dtype)
            nn.init.zeros_(self.router_noise.weight)
        else:
            self.router_noise = None
        if self.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(e, device=device, dtype=torch.float32))
        else:
            self.register_buffer("expert_bias", None)
        self.register_buffer("load_since_update", torch.zeros(e, device=device, dtype=torch.float32),
                             persistent=False)
        self.aux_loss = torch.zeros((), device=device)
        self.aux_losses: dict[str, float] = {}
        self.last_expert_counts = torch.zeros(e, dtype=torch.long, device=device)

    def routing_options(self) -> dict:
        """Constructor keyword arguments that reproduce this layer's routing."""
        return {
            "routing": self.routing, "normalize_gates": self.normalize_gates, "balance_loss": self.balance_loss,
            "aux_loss_coef": self.aux_loss_coef, "z_loss_coef": self.z_loss_coef,
            "bias_balancing": self.bias_balancing, "bias_update_rate": self.bias_update_rate,
        }

    def _where(self) -> str:
        site = getattr(self, "site_name", None)
        return f"{type(self).__name__} {site!r}" if site else type(self).__name__

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._where()}: expected a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{self._where()}: expected input of shape [..., {self.hidden_size}] "
                f"(last dim = hidden_size={self.hidden_size}), got shape {tuple(x.shape)}"
            )

    def select_experts(self, x_flat: Tensor) -> tuple[Tensor, Tensor, dict]:
        """Routing decision for ``[N, H]`` tokens, without bookkeeping.

        Returns ``(topk_idx [N, k], topk_gates [N, k], parts)`` where ``parts``
        holds ``logits`` (clean), ``scores`` ``[N, E]`` and, for noisy routing in
        training, ``noisy`` and ``noise_std``.
        """
        logits = self.router(x_flat)
        parts: dict = {"logits": logits}
        select_logits = logits
        if self.router_noise is not None and self.training:
            compute = torch.promote_types(logits.dtype, torch.float32)
            noise_std = F.softplus(self.router_noise(x_flat).to(compute)) + NOISE_EPSILON
            select_logits = logits.to(compute) + torch.randn_like(noise_std) * noise_std
            parts.update(noisy=select_logits, noise_std=noise_std)
        score = "sigmoid" if self.routing == "sigmoid" else "softmax"
        topk_idx, topk_gates, scores = route_tokens(
            select_logits, self.top_k, self.normalize_gates, score=score, selection_bias=self.expert_bias
        )
        parts["scores"] = scores
        return topk_idx, topk_gates, parts

    def route(self, x_flat: Tensor) -> tuple[Tensor, Tensor]:
        """Route ``[N, H]`` tokens; sets ``aux_loss``, ``aux_losses`` and ``last_expert_counts``.

        Returns ``(topk_idx [N, k], topk_gates [N, k])``. Non-finite router
        logits raise ``FloatingPointError`` naming the layer.
        """
        topk_idx, topk_gates, parts = self.select_experts(x_flat)
        logits = parts["logits"]
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
            raise FloatingPointError(
                f"{self._where()}: the router produced non-finite scores (NaN/inf) for {bad} of "
                f"{logits.shape[0]} tokens; check the input and the router weights"
            )
        counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)
        balance = self._balance_loss(topk_idx, topk_gates, counts, parts)
        aux = self.aux_loss_coef * balance
        z = None
        if self.z_loss_coef > 0:
            z = router_z_loss(logits)
            aux = aux + self.z_loss_coef * z
        self.aux_loss = aux
        self.aux_losses = {"balance": float(balance.detach()) if isinstance(balance, Tensor) else float(balance)}
        if z is not None:
            self.aux_losses["z"] = float(z.detach())
        self.last_expert_counts = counts.detach()
        if self.training and self.expert_bias is not None:
            self.load_since_update += counts.detach().to(self.load_since_update.dtype)
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
        if is_exporting():
            return
        with torch.no_grad():
            dense = torch.zeros(topk_idx.shape[0], self.num_experts, device=topk_gates.device, dtype=torch.float32)
            dense.scatter_add_(1, topk_idx, topk_gates.detach().float())
            if stats:
                self.update_routing_stats_(dense.mean(0))
            if probe is not None:
                probe.append(dense)

    def _balance_loss(self, topk_idx: Tensor, topk_gates: Tensor, counts: Tensor, parts: dict) -> Tensor:
        scores = parts["scores"]
        if self.balance_loss == "none" or self.aux_loss_coef == 0:
            return scores.new_zeros(())
        if self.balance_loss == "switch":
            score = "sigmoid" if self.routing == "sigmoid" else "softmax"
            return switch_load_balancing_loss(expert_distribution(scores, score), counts, self.top_k)
        if "noisy" in parts and self.top_k < self.num_experts:
            logits = parts["logits"].to(parts["noisy"].dtype)
            if self.expert_bias is not None:
                logits = logits + self.expert_bias
                noisy = parts["noisy"] + self.expert_bias
            else:
                noisy = parts["noisy"]
            load = noisy_top_k_load(logits, noisy, parts["noise_std"], self.top_k)
        else:
            load = counts
        return cv2_balancing_loss(topk_idx, topk_gates, load, self.num_experts)

    def update_expert_bias(self) -> bool:
        """Auxiliary-loss-free step: ``b_e += gamma * sign(mean load - load_e)``; resets the load counter.

        Returns whether the bias changed (False without ``bias_balancing`` or
        when no training forward ran since the last update).
        """
        if self.expert_bias is None:
            return False
        load = self.load_since_update
        if float(load.sum()) == 0.0:
            return False
        sign_bias_update(self.expert_bias, load, self.bias_update_rate)
        load.zero_()
        return True

    def expert_load(self) -> dict[str, object]:
        """Load statistics of the last forward: ``counts`` (list), ``fraction`` (list),
        ``max_over_mean`` and ``cv`` (std / mean of the counts; 0 = perfectly even)."""
        counts = self.last_expert_counts.detach().double().cpu()
        total = float(counts.sum())
        mean = total / counts.numel()
        return {
            "counts": [int(c) for c in counts.tolist()],
            "fraction": [float(c) / total if total else 0.0 for c in counts.tolist()],
            "max_over_mean": float(counts.max()) / mean if mean else 0.0,
            "cv": float(counts.std(unbiased=False)) / mean if mean else 0.0,
        }

    def _moe_forward(self, x: Tensor, weights: Callable[[], WeightTuple],
                     gate_weights: Callable[[], tuple[Tensor | None, Tensor | None]]) -> Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, self.hidden_size)
        topk_idx, topk_gates = self.route(x_flat)
        w_in, b_in, w_out, b_out = weights()
        w_gate, b_gate = gate_weights()
        out = moe_dispatch(x_flat, topk_idx, topk_gates, w_in, b_in, w_out, b_out, self.act,
                           counts=self.last_expert_counts, w_gate=w_gate, b_gate=b_gate)
        return out.reshape(*lead, self.hidden_size)

    def _routing_repr(self) -> str:
        text = f"routing={self.routing!r}, balance_loss={self.balance_loss!r}, aux_loss_coef={self.aux_loss_coef}"
        if self.z_loss_coef:
            text += f", z_loss_coef={self.z_loss_coef}"
        if self.bias_balancing:
            text += f", bias_balancing=True, bias_update_rate={self.bias_update_rate}"
        return text

    def __getstate__(self):
        # aux_loss usually carries a graph; non-leaf tensors cannot be deep-copied.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__  # type: ignore[misc]
        state = dict(state)
        if isinstance(state.get("aux_loss"), Tensor):
            state["aux_loss"] = state["aux_loss"].detach()
        return state


def _moe_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _MoERouting)]


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every MoE layer of ``model`` (a 0-d zero if none).

    Each ``aux_loss`` is already multiplied by its layer's coefficients
    (``aux_loss_coef``, ``z_loss_coef``) and reflects the layer's most recent
    forward; add the result to the task loss.
    """
    total = None
    for _, module in _moe_layers(model):
        aux = module.aux_loss
        total = aux if total is None else total + aux.to(total.device)
    if total is None:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def update_expert_biases(model: nn.Module) -> int:
    """Apply :meth:`_MoERouting.update_expert_bias` to every MoE layer; returns how many changed.

    Call once after each optimizer step when any layer uses ``bias_balancing``.
    """
    return sum(1 for _, m in _moe_layers(model) if m.update_expert_bias())


def expert_load_stats(model: nn.Module) -> dict[str, dict[str, object]]:
    """``{qualified layer name: layer.expert_load()}`` for every MoE layer (last forward)."""
    return {name: m.expert_load() for name, m in _moe_layers(model)}


def summarize_expert_load(model: nn.Module, prefix: str = "moe/") -> dict[str, float]:
    """Flat scalars for loggers: mean and max over layers of ``max_over_mean`` and ``cv``,
    the mean balance / z losses and the mean |expert bias| (when used)."""
    layers = _moe_layers(model)
    if not layers:
        return {}
    ratios = [m.expert_load()["max_over_mean"] for _, m in layers]
    cvs = [m.expert_load()["cv"] for _, m in layers]
    out = {
        f"{prefix}load_max_over_mean": max(ratios),
        f"{prefix}load_max_over_mean_avg": sum(ratios) / len(ratios),
        f"{prefix}load_cv_avg": sum(cvs) / len(cvs),
    }
    for key in ("balance", "z"):
        vals = [m.aux_losses[key] for _, m in layers if key in m.aux_losses]
        if vals:
            out[f"{prefix}{key}_loss_avg"] = sum(vals) / len(vals)
    biases = [m.expert_bias for _, m in layers if m.expert_bias is not None]
    if biases:
        out[f"{prefix}expert_bias_abs_avg"] = float(torch.cat([b.detach().abs().cpu() for b in biases]).mean())
    return out


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
        bias: expert / static biases for every projection.
        scale: ``"learned"`` (one phi, lambda_d = 2 sigmoid(phi)) or ``"none"``.
        aux_loss_coef: multiplier of the balancing loss stored in ``aux_loss``.
        normalize_gates: renormalise the top-k scores to sum to one.
        gated: gated experts ``act(x W_gate) * (x W_in)`` then ``W_out``.
        routing, balance_loss, z_loss_coef, bias_balancing, bias_update_rate:
            routing variants, see :class:`_MoERouting` (defaults: softmax top-k,
            Switch loss, no z-loss, no bias balancing, gamma 1e-3).

    Attributes:
        experts_in ``[E, I, H]``, experts_out ``[E, H, I]``, static_in ``[I, H]``,
        static_out ``[H, I]``; mode_mask_in ``[I, H]`` / mode_mask_out ``[H, I]``
        float buffers (1 = dynamic, all ones at construction); with ``gated``:
        experts_gate ``[E, I, H]``, static_gate ``[I, H]``, mode_mask_gate
        ``[I, H]`` (else ``None``); with ``bias``: experts_bias_in ``[E, I]``,
        experts_bias_out ``[E, H]``, static_bias_in ``[I]``, static_bias_out
        ``[H]``, mode_mask_bias_in ``[I]``, mode_mask_bias_out ``[H]`` (and
        the ``bias_gate`` triple when gated); ``router`` (``nn.Linear(H, E,
        bias=False)``); ``router_noise`` (noisy routing) and ``expert_bias``
        ``[E]`` (bias balancing) or ``None``; ``scale`` (:class:`ScaleFactors`);
        ``act`` (the activation callable) and ``activation`` (its name);
        ``aux_loss`` (0-d tensor, set by every forward, in at least float32) and
        ``last_expert_counts`` (long ``[E]``, detached).
    """

    _mode_group_specs = (
        ("in", "experts_in", "static_in", "mode_mask_in", 0, 2),
        ("gate", "experts_gate", "static_gate", "mode_mask_gate", 0, 2),
        ("out", "experts_out", "static_out", "mode_mask_out", 0, 2),
        ("bias_in", "experts_bias_in", "static_bias_in", "mode_mask_bias_in", 0, 1),
        ("bias_gate", "experts_bias_gate", "static_bias_gate", "mode_mask_bias_gate", 0, 1),
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
        gated: bool = False,
        routing: str = "softmax",
        balance_loss: str = "switch",
        z_loss_coef: float = 0.0,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
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
        self.normalize_gates = bool(normalize_gates)
        self.gated = bool(gated)
        self.act, self.activation = resolve_activation(activation)

        h, i, e = hidden_size, intermediate_size, num_experts
        fk = {"device": device, "dtype": dtype}
        self.experts_in = nn.Parameter(torch.empty(e, i, h, **fk))
        self.experts_out = nn.Parameter(torch.empty(e, h, i, **fk))
        self.static_in = nn.Parameter(torch.empty(i, h, **fk))
        self.static_out = nn.Parameter(torch.empty(h, i, **fk))
        register_mask(self, "mode_mask_in", (i, h), device=device, dtype=dtype)
        register_mask(self, "mode_mask_out", (h, i), device=device, dtype=dtype)
        if self.gated:
            self.experts_gate = nn.Parameter(torch.empty(e, i, h, **fk))
            self.static_gate = nn.Parameter(torch.empty(i, h, **fk))
            register_mask(self, "mode_mask_gate", (i, h), device=device, dtype=dtype)
        else:
            self.register_parameter("experts_gate", None)
            self.register_parameter("static_gate", None)
            self.register_buffer("mode_mask_gate", None)
        bias_groups = {"in": i, "out": h}
        if self.gated:
            bias_groups["gate"] = i
        for group in ("in", "gate", "out"):
            size = bias_groups.get(group) if bias else None
            if size is None:
                self.register_parameter(f"experts_bias_{group}", None)
                self.register_parameter(f"static_bias_{group}", None)
                self.register_buffer(f"mode_mask_bias_{group}", None)
                continue
            setattr(self, f"experts_bias_{group}", nn.Parameter(torch.empty(e, size, **fk)))
            setattr(self, f"static_bias_{group}", nn.Parameter(torch.empty(size, **fk)))
            register_mask(self, f"mode_mask_bias_{group}", (size,), device=device, dtype=dtype)
        self._init_routing(routing, balance_loss, aux_loss_coef, z_loss_coef, bias_balancing, bias_update_rate,
                           device=device, dtype=dtype)
        self.scale = ScaleFactors(scale, **fk)
        register_routing_stats(self, e, 1.0 / e, device=device)
        self.reset_parameters()

    #: every expert holds the same value at a static entry: static -> dynamic is exact for any
    #: gates, and dynamic -> static folds the experts with their normalised mean gate weights
    routing_sums_to_one = True
    routing_normalize_mix = True

    @property
    def has_bias(self) -> bool:
        return self.experts_bias_in is not None

    def reset_parameters(self) -> None:
        """nn.Linear's default init for every expert (independently), the static copy and the router."""
        groups = ("in", "out", "gate") if self.gated else ("in", "out")
        with torch.no_grad():
            for e in range(self.num_experts):
                for g in groups:
                    bias = getattr(self, f"experts_bias_{g}")
                    _linear_init_(getattr(self, f"experts_{g}")[e], None if bias is None else bias[e])
            for g in groups:
                _linear_init_(getattr(self, f"static_{g}"), getattr(self, f"static_bias_{g}"))
        self.router.reset_parameters()

    def _combined(self, group: str) -> Tensor | None:
        """``lambda_d * M * W_e + lambda_s * (L - M) * W_s`` for every expert ``[E, *shape]``.

        ``L`` is the group's live mask (ones unless it has pruned entries).
        Same terms as :func:`modes.combine_factors`, fused into one ``addcmul``
        pass over the expert tensor (one read of ``W_e``, one write).
        """
        dyn = getattr(self, f"experts_{group}")
        if dyn is None:
            return None
        lambda_s, lambda_d = self.scales()
        mask = getattr(self, f"mode_mask_{group}").to(dyn.dtype)
        live = getattr(self, live_mask_attr(f"mode_mask_{group}"), None)  # registered only once pruned
        static_mask = (1.0 - mask) if live is None else (live.to(dyn.dtype) - mask)
        static_term = getattr(self, f"static_{group}") * (lambda_s * static_mask)
        return torch.addcmul(static_term, dyn, lambda_d * mask)

    def effective_weights(self) -> WeightTuple:
        """``(w_in [E, I, H], b_in [E, I] | None, w_out [E, H, I], b_out [E, H] | None)``.

        Every expert's effective weight ``lambda_d * M * W_e + lambda_s * (1 - M) * W_s``
        (dead entries get zero gradient).
        For gated experts ``w_in`` is the up projection; see :meth:`effective_gate_weights`.
        """
        return (self._combined("in"), self._combined("bias_in"), self._combined("out"), self._combined("bias_out"))

    def effective_gate_weights(self) -> tuple[Tensor | None, Tensor | None]:
        """``(w_gate [E, I, H], b_gate [E, I] | None)`` of gated experts, ``(None, None)`` otherwise."""
        return self._combined("gate"), self._combined("bias_gate")

    def forward(self, x: Tensor) -> Tensor:
        """``[..., H] -> [..., H]``; also sets ``aux_loss`` and ``last_expert_counts``.

        Inference (no autograd, not exporting) reuses the combined expert weights
        until a parameter, mask or live mask changes (version counters), as the
        deploy form does; with autograd they are recombined every call.
        """
        groups = self.mode_groups()
        fractional = any(g.mask.requires_grad or (g.live is not None and g.live.requires_grad) for g in groups)
        if torch.is_grad_enabled() or is_exporting() or fractional:
            # autograd, export, or a mask that requires grad (fractional gates: a fresh tensor per call)
            self.__dict__.pop("_inference_cache", None)
            return self._moe_forward(x, self.effective_weights, self.effective_gate_weights)
        weights, gate_weights = cached_derived(
            self, "effective", self._factor_tensors(groups),
            lambda: (self.effective_weights(), self.effective_gate_weights()))
        return self._moe_forward(x, lambda: weights, lambda: gate_weights)

    def _factor_tensors(self, groups) -> tuple[Tensor, ...]:
        """Every tensor the effective weights depend on (cache key material); ``groups``: :meth:`mode_groups`."""
        tensors = []
        for g in groups:
            tensors += [g.dynamic, g.static, g.mask] + ([] if g.live is None else [g.live])
        if self.scale.phi is not None:
            tensors.append(self.scale.phi)
        return tuple(tensors)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
            f"gated={self.gated}, bias={self.has_bias}, normalize_gates={self.normalize_gates}, "
            + self._routing_repr()
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
        fc_gate: nn.Linear | None = None,
        name: str | None = None,
        **kwargs,
    ) -> "MoEFeedForward":
        """Build an MoE layer from a dense FFN ``act(fc_in(x)) -> fc_out``, or a
        gated one ``act(fc_gate(x)) * fc_in(x) -> fc_out`` when ``fc_gate`` is given.

        ``fc_in`` (and ``fc_gate``) is ``Linear(H, I)``, ``fc_out`` is
        ``Linear(I, H)``; the result has the dtype and device of ``fc_in`` and
        a bias iff any of the layers has one (a missing one is zero). The mask
        starts all ones; ``kwargs`` go to the constructor (``scale``,
        ``aux_loss_coef``, ``normalize_gates``, the routing options).
        The router weight is drawn from ``N(0, router_init_std^2)``. ``name``
        (the FFN's qualified name) is kept as ``site_name`` and named in errors.

        ``init="upcycle"`` (sparse upcycling): every expert and the static copy
        start as the dense weights, and each expert tensor ``T`` gets
        ``noise_std * T.std() * randn`` added (biases whose std is 0 use the
        std of their weight matrix) to break the symmetry. With
        ``noise_std=0`` all experts equal the dense FFN, so the MoE reproduces
        it exactly for any routing (gates sum to one with
        ``normalize_gates=True``) -- but that is the IMP symmetry trap
        (docs/design.md 1): all mode-partition scores are zero.

        ``init="split"`` (MoEBERT-style importance split; intermediate size
        becomes ``expert_size``): neurons are ranked by ``importance`` (``[I]``,
        e.g. accumulated ``|activation * grad|``; default proxy
        ``||W_in[i, :]||_2 * ||W_out[:, i]||_2``, times ``||W_gate[i, :]||_2`` when
        gated), ties by index.
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
        ``[E, expert_size]``, original neuron ids) and ``num_shared``; the gate
        projection of a gated FFN is split with the same indices as ``fc_in``.
        """
        where = f"FFN {name!r}: " if name else ""
        if not isinstance(fc_in, nn.Linear) or not isinstance(fc_out, nn.Linear):
            raise TypeError(f"{where}from_dense expects nn.Linear layers (fc_in: H -> I, fc_out: I -> H), got "
                            f"{type(fc_in).__name__} and {type(fc_out).__name__}")
        if fc_gate is not None and not isinstance(fc_gate, nn.Linear):
            raise TypeError(f"{where}fc_gate must be an nn.Linear (H -> I), got {type(fc_gate).__name__}")
        i_dense, h = fc_in.weight.shape
        if tuple(fc_out.weight.shape) != (h, i_dense):
            raise ValueError(
                f"{where}fc_out must be Linear({i_dense}, {h}) to match fc_in Linear({h}, {i_dense}); "
                f"got weight shape {tuple(fc_out.weight.shape)} (expected {(h, i_dense)})"
            )
        if fc_gate is not None and tuple(fc_gate.weight.shape) != (i_dense, h):
            raise ValueError(
                f"{where}fc_gate must be Linear({h}, {i_dense}) like fc_in (the up projection); "
                f"got weight shape {tuple(fc_gate.weight.shape)} (expected {(i_dense, h)})"
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
            has_bias = any(fc is not None and fc.bias is not None for fc in (fc_in, fc_out, fc_gate))
            b_in = fc_in.bias.detach().to(w_in) if fc_in.bias is not None else w_in.new_zeros(i_dense)
            b_out = fc_out.bias.detach().to(w_in) if fc_out.bias is not None else w_in.new_zeros(h)
            w_gate = b_gate = None
            if fc_gate is not None:
                w_gate = fc_gate.weight.detach().to(w_in)
                b_gate = fc_gate.bias.detach().to(w_in) if fc_gate.bias is not None else w_in.new_zeros(i_dense)

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
                if w_gate is not None:
                    importance = importance * w_gate.float().norm(dim=1)
            importance = torch.as_tensor(importance).detach()
            if importance.shape != (i_dense,):
                raise ValueError(f"importance must have shape [{i_dense}], got {tuple(importance.shape)}")
            idx, static_idx, num_shared = _split_assignment(importance, num_experts, size, num_shared)
            split_indices = idx

        if kwargs.get("gated", fc_gate is not None) != (fc_gate is not None):
            raise ValueError(f"{where}gated={kwargs['gated']} but fc_gate is {'missing' if fc_gate is None else 'given'}")
        kwargs["gated"] = fc_gate is not None
        moe = cls(h, size, num_experts=num_experts, top_k=top_k, activation=activation, bias=has_bias,
                  device=device, dtype=dtype, **kwargs)
        static_idx = static_idx.to(device)
        with torch.no_grad():
            moe.static_in.copy_(w_in[static_idx])
            moe.static_out.copy_(w_out[:, static_idx])
            if w_gate is not None:
                moe.static_gate.copy_(w_gate[static_idx])
            if has_bias:
                moe.static_bias_in.copy_(b_in[static_idx])
                moe.static_bias_out.copy_(b_out)
                if w_gate is not None:
                    moe.static_bias_gate.copy_(b_gate[static_idx])
            for e in range(num_experts):
                sel = idx[e].to(device)
                _copy_with_noise(moe.experts_in[e], w_in[sel], noise_std, None, generator)
                _copy_with_noise(moe.experts_out[e], w_out[:, sel], noise_std, None, generator)
                if w_gate is not None:
                    _copy_with_noise(moe.experts_gate[e], w_gate[sel], noise_std, None, generator)
                if has_bias:
                    _copy_with_noise(moe.experts_bias_in[e], b_in[sel], noise_std, w_in, generator)
                    _copy_with_noise(moe.experts_bias_out[e], b_out, noise_std, w_out, generator)
                    if w_gate is not None:
                        _copy_with_noise(moe.experts_bias_gate[e], b_gate[sel], noise_std, w_gate, generator)
            moe.router.weight.normal_(0.0, router_init_std, generator=generator)
        if name:
            moe.site_name = name
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

    Holds the router (with ``router_noise`` / ``expert_bias`` when the source
    uses them), the activation and one :class:`PackedModeGroup` per mode group
    (``in_proj``, ``out_proj``, ``gate_proj`` for gated experts, and
    ``bias_in`` / ``bias_out`` / ``bias_gate`` when the source layer has
    biases, else ``None``). Static entries are stored once, dynamic entries
    ``E`` times. Outputs, ``aux_loss`` and ``last_expert_counts`` match the
    source layer.

    Build it with :meth:`from_layer`; the constructor makes zero-valued packed
    groups from ``masks`` (group name -> mask: ``"in"`` ``[I, H]``, ``"out"``
    ``[H, I]``, optional ``"gate"`` ``[I, H]``, optional ``"bias_in"`` ``[I]``,
    ``"bias_out"`` ``[H]`` and, gated, ``"bias_gate"`` ``[I]``), e.g. to load a
    saved deploy checkpoint.
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
        routing: str = "softmax",
        balance_loss: str = "switch",
        z_loss_coef: float = 0.0,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        self.hidden_size = _check_positive("hidden_size", hidden_size)
        self.intermediate_size = _check_positive("intermediate_size", intermediate_size)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.top_k = _check_top_k(top_k, num_experts)
        self.normalize_gates = bool(normalize_gates)
        self.act, self.activation = resolve_activation(activation)
        h, i = hidden_size, intermediate_size
        shapes = {"in": (i, h), "gate": (i, h), "out": (h, i), "bias_in": (i,), "bias_gate": (i,), "bias_out": (h,)}
        keys = set(masks)
        gated = "gate" in keys
        with_bias = "bias_in" in keys
        expected = {"in", "out"} | ({"gate"} if gated else set())
        if with_bias:
            expected |= {"bias_in", "bias_out"} | ({"bias_gate"} if gated else set())
        if keys != expected:
            raise ValueError(f"masks must have keys 'in', 'out', optionally 'gate' (gated experts) and the "
                             f"matching 'bias_*' keys; got {sorted(keys)}, expected {sorted(expected)}")
        self.gated = gated
        for name, attr in _PACKED_ATTRS.items():
            if name not in masks:
                setattr(self, attr, None)
                continue
            mask = masks[name]
            if tuple(mask.shape) != shapes[name]:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {shapes[name]}")
            setattr(self, attr, PackedModeGroup(mask.detach() > 0.5, num_experts, device=device, dtype=dtype))
        self._init_routing(routing, balance_loss, aux_loss_coef, z_loss_coef, bias_balancing, bias_update_rate,
                           device=device, dtype=dtype)

    @classmethod
    def from_layer(cls, moe: MoEFeedForward) -> "CompactMoEFeedForward":
        if not isinstance(moe, MoEFeedForward):
            raise TypeError(f"from_layer expects a MoEFeedForward, got {type(moe).__name__}")
        groups = {g.name: g for g in moe.mode_groups()}
        options = moe.routing_options()
        compact = cls(
            moe.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
            masks={name: g.mask for name, g in groups.items()},
            activation=copy.deepcopy(moe.act) if isinstance(moe.act, nn.Module) else moe.act,
            device=moe.static_in.device, dtype=moe.static_in.dtype, **options,
        )
        compact.activation = moe.activation
        with torch.no_grad():
            lambda_s, lambda_d = (s.detach() for s in moe.scales())
            for name, g in groups.items():
                setattr(compact, _PACKED_ATTRS[name], PackedModeGroup.from_group(g, lambda_s, lambda_d))
        compact.router = copy.deepcopy(moe.router)
        if moe.router_noise is not None:
            compact.router_noise = copy.deepcopy(moe.router_noise)
        if moe.expert_bias is not None:
            compact.expert_bias.copy_(moe.expert_bias)
        if getattr(moe, "site_name", None):
            compact.site_name = moe.site_name
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

    def effective_gate_weights(self) -> tuple[Tensor | None, Tensor | None]:
        """Same as :meth:`MoEFeedForward.effective_gate_weights`."""
        return self._expert_weights(self.gate_proj), self._expert_weights(self.bias_gate)

    def forward(self, x: Tensor) -> Tensor:
        return self._moe_forward(x, self.effective_weights, self.effective_gate_weights)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
            f"gated={self.gated}, normalize_gates={self.normalize_gates}, " + self._routing_repr()
        )
