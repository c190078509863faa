"""Learned mode gates: a stochastic gate per decision unit learns which entries stay dynamic.

While gates are attached, every PAD layer combines its factors with a gate
``z`` in place of its 0/1 mode mask (docs/partition.md, "Learned mode gates")::

    W_hat = lambda_d * z * sum_k pi_k W_k + lambda_s * (1 - z) * W_s

``z`` is one number per *unit* (the units of Iterative Mode Partition:
``"element"``, ``"kernel"`` or ``"channel"``, see :mod:`padnet.transforms.partition.units`),
broadcast to the unit's entries. Two estimators:

- ``"hard_concrete"`` (Louizos, Welling & Kingma 2018): ``z`` is a hard concrete
  sample, differentiable in ``log_alpha`` (reparameterisation).
- ``"arm"`` (the Neural Plasticity Networks of Li & Ji 2019, arXiv 1908.08118):
  ``z`` is a binary Bernoulli(``sigmoid(k * phi)``) sample; ``phi`` gets the
  augment-REINFORCE-merge gradient from a second (antithetic) forward pass,
  :meth:`ModeGates.arm_update_`.

The budget (:meth:`ModeGates.penalty`) is a Lagrangian with learned
multipliers that drives the expected deployable cost to ``target_ratio``;
:meth:`ModeGates.harden_` turns the deterministic gates into 0/1 masks with
exactly the target ratio (top-k on the gate probability), folds the gates into
the weights so the function is kept, and removes the gates.

How the gate reaches the forward pass (no layer code changes): a forward
pre-hook on each PAD layer puts the gate into the layer's mask attributes for
the duration of the call. Gates that are all exactly 0 or 1 (ARM's samples, a
hard-concrete sample saturated by the clamp, where ``dz/dlog_alpha = 0``) are
copied into the mask buffers in place, so the layer runs as the plain masked
layer, fast paths included. Fractional gates (hard concrete) replace the mask
buffers with a tensor that requires grad -- the differentiable gate while
autograd records, a detached leaf otherwise -- so the layer takes its general
``combine_factors`` path (the rule IMP's ``dL/dM`` relies on; the fast paths
would read a fractional mask as 0/1); a forward hook restores the buffers.
The gate parameters live in a child module
``layer.mode_gate`` (ordinary parameters: saved with ``model.state_dict()``,
synchronised by DDP); the multipliers and the sharpness schedule live in the
:class:`ModeGates` module (its own ``state_dict``).

With ``density`` (the pruned mode, :mod:`padnet.layers.modes`), a second gate
``z_l`` per unit decides live vs pruned with its own budget: the layer sees the
live mask ``L = z_l`` and the mode mask ``D = z_d * z_l`` (put into its live-mask
buffers by the same hooks), ``W_hat = lambda_d z_d z_l sum_k pi_k W_k +
lambda_s (z_l - z_d z_l) W_s``; hardening keeps ``round(density * N)`` live
entries and prunes the rest.

The transform record (:mod:`padnet.transforms.record`): attaching gates
records a ``"gates"`` step (the config and the gated layers' unit counts), which
:func:`padnet.load` replays -- the gates come back attached, their values from
the file; :meth:`ModeGates.from_model` rebuilds the controller around them.
:meth:`ModeGates.harden_` / :meth:`ModeGates.remove_` record ``"harden_gates"``;
a load then skips the earlier ``"gates"`` step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..layers.modes import is_compact_layer, is_pad_layer, live_mask_attr
from .partition.units import GRANULARITIES, LayerPlan, round_half_up, select_top
from .record import ReplayContext, find_state, get_state, register_op

__all__ = [
    "ModeGates",
    "LayerGate",
    "HardConcrete",
    "ARM",
    "ESTIMATORS",
    "SCHEDULES",
    "INITS",
    "SCOPES",
    "get_estimator",
]

SCHEDULES = ("constant", "linear", "geometric", "npn")
INITS = ("open", "hibernate")
SCOPES = ("global", "layer")
_UNIFORM_EPS = 1e-6


# ----------------------------------------------------------------------------- estimators
class HardConcrete:
    """Hard concrete gates (Louizos et al. 2018, "Learning sparse neural networks through L0").

    Parameter ``log_alpha`` per unit; sharpness ``s = 1 / beta`` (default
    ``1.5``: the paper's ``beta = 2/3``). With ``u ~ U(0, 1)``::

        sample z  = clamp((zeta - gamma) * sigmoid((log u - log(1 - u) + log_alpha) / beta) + gamma, 0, 1)
        test z    = clamp((zeta - gamma) * sigmoid(log_alpha) + gamma, 0, 1)
        P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))     (expected L0 per unit)

    with ``gamma = -0.1``, ``zeta = 1.1``; ``log_alpha`` starts at
    ``log((1 - p) / p)`` for a drop rate ``p``.
    """

    name = "hard_concrete"
    param_name = "log_alpha"
    gamma = -0.1
    zeta = 1.1
    default_sharpness = 1.5  # 1 / beta, beta = 2/3
    differentiable = True

    @staticmethod
    def init_value(p_drop: float, sharpness: float) -> float:
        return math.log((1.0 - p_drop) / p_drop)

    def prob_open(self, param: Tensor, sharpness: float) -> Tensor:
        beta = 1.0 / sharpness
        return torch.sigmoid(param - beta * math.log(-self.gamma / self.zeta))

    def sample(self, param: Tensor, sharpness: float) -> Tensor:
        u = torch.rand_like(param).clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + param) * sharpness)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self, param: Tensor, sharpness: float) -> Tensor:
        return (torch.sigmoid(param) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)


class ARM:
    """Binary gates with the augment-REINFORCE-merge gradient (NPN, Li & Ji 2019).

    Parameter ``phi`` per unit; sharpness ``k``; ``pi = sigmoid(k * phi)``.
    Training draws ``u ~ U(0, 1)`` per unit and uses ``z = 1[u < pi]``; the
    antithetic sample is ``z' = 1[u > 1 - pi]``. For a loss ``f``::

        d E[f(z)] / d phi = k * E_u[(f(z') - f(z)) * (u - 1/2)]

    (unbiased). Test gate ``1[pi > 1/2]``. ``phi`` starts at
    ``log((1 - p) / p) / k`` for a drop rate ``p`` (so ``pi = 1 - p``).
    """

    name = "arm"
    param_name = "phi"
    default_sharpness = 7.0
    differentiable = False

    @staticmethod
    def init_value(p_drop: float, sharpness: float) -> float:
        return math.log((1.0 - p_drop) / p_drop) / sharpness

    def prob_open(self, param: Tensor, sharpness: float) -> Tensor:
        return torch.sigmoid(param * sharpness)

    def deterministic(self, param: Tensor, sharpness: float) -> Tensor:
        return (param > 0).to(param.dtype)  # pi > 1/2


ESTIMATORS: dict[str, Any] = {"hard_concrete": HardConcrete(), "arm": ARM()}


def get_estimator(name: str):
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[name]


# ----------------------------------------------------------------------------- one layer
class LayerGate(nn.Module):
    """The gates of one PAD layer: one parameter per decision unit.

    ``log_alpha`` (hard concrete) or ``phi`` (ARM): ``[num_units]``;
    ``sharpness``: 0-d buffer (saved). With ``live_init`` (``ModeGates(density=...)``)
    a second gate ``live_log_alpha`` / ``live_phi`` ``[num_units]`` decides live vs
    pruned (same estimator and units): the layer then sees the live mask
    ``L = z_l`` and the mode mask ``D = z_d * z_l``. The gate hooks itself into
    the layer it was built for (:meth:`attach`).
    """

    def __init__(self, layer_name: str, layer: nn.Module, granularity: str, estimator: str, init: Tensor,
                 sharpness: float, live_init: Tensor | None = None) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.granularity = granularity
        self.estimator_name = estimator
        plan = LayerPlan(layer_name, layer, granularity)
        self.__dict__["_plan"] = plan
        ref = plan.groups[0].dynamic
        if init.shape != (plan.num_units,):
            raise ValueError(f"{layer_name}: gate init has shape {tuple(init.shape)}, expected ({plan.num_units},)")
        self.register_parameter(self.estimator.param_name,
                                nn.Parameter(init.to(device=ref.device, dtype=torch.float32)))
        if live_init is not None:
            if live_init.shape != (plan.num_units,):
                raise ValueError(f"{layer_name}: live gate init has shape {tuple(live_init.shape)}, "
                                 f"expected ({plan.num_units},)")
            self.register_parameter("live_" + self.estimator.param_name,
                                    nn.Parameter(live_init.to(device=ref.device, dtype=torch.float32)))
        self.register_buffer("sharpness", torch.tensor(float(sharpness), dtype=torch.float32, device=ref.device))
        _, sizes = plan.unit_sums({g.name: torch.ones(g.shape) for g in plan.groups}, torch.float32)
        self.register_buffer("unit_sizes", sizes.to(ref.device), persistent=False)
        self.num_factors = int(ref.shape[0])
        # group name -> mask attribute of the layer
        buffers = {id(b): n for n, b in layer.named_buffers(recurse=False)}
        self.mask_attrs = {g.name: buffers[id(g.mask)] for g in plan.groups}
        # group name -> live-mask attribute (registered by attach() through layer.set_modes)
        self.live_attrs = {g: live_mask_attr(a) for g, a in self.mask_attrs.items()} if live_init is not None else {}
        self._handles: list[Any] = []
        self._swapped: dict[str, Tensor] = {}
        self._arm_u: Tensor | None = None
        self._arm_u_live: Tensor | None = None
        self._arm_antithetic = False

    # ---- parameters and probabilities --------------------------------------------------------
    @property
    def estimator(self):
        return ESTIMATORS[self.estimator_name]

    @property
    def param(self) -> Tensor:
        return getattr(self, self.estimator.param_name)

    @property
    def live_param(self) -> Tensor | None:
        """The live gate's parameter ``[num_units]``, or ``None`` without a live gate."""
        return self._parameters.get("live_" + self.estimator.param_name)

    @property
    def has_live_gate(self) -> bool:
        return self.live_param is not None

    @property
    def plan(self) -> LayerPlan:
        return self.__dict__["_plan"]

    @property
    def num_units(self) -> int:
        return self.plan.num_units

    @property
    def num_entries(self) -> int:
        return self.plan.num_entries

    def k(self) -> float:
        return float(self.sharpness)

    def prob_open(self) -> Tensor:
        """``[num_units]`` probability that each unit's gate is non-zero (dynamic)."""
        return self.estimator.prob_open(self.param, self.k())

    def live_prob_open(self) -> Tensor:
        """``[num_units]`` probability that each unit's live gate is non-zero (live); ones without one."""
        lp = self.live_param
        if lp is None:
            return torch.ones_like(self.param)
        return self.estimator.prob_open(lp, self.k())

    def expected_dynamic(self) -> Tensor:
        """Expected number of dynamic entries (0-d, differentiable in the dynamic gate only).

        With a live gate an entry is dynamic only if also live: ``P(z_d != 0) P(z_l != 0)``,
        the live factor detached (the live gate answers to its own budget)."""
        p = self.prob_open()
        if self.has_live_gate:
            p = p * self.live_prob_open().detach()
        return (p * self.unit_sizes).sum()

    def expected_live(self) -> Tensor:
        """Expected number of live (not pruned) entries (0-d, differentiable in the live gate)."""
        return (self.live_prob_open() * self.unit_sizes).sum()

    def deterministic_units(self) -> Tensor:
        return self.estimator.deterministic(self.param, self.k())

    def deterministic_live_units(self) -> Tensor:
        """The live gate's test value per unit (ones without a live gate)."""
        lp = self.live_param
        return torch.ones_like(self.param) if lp is None else self.estimator.deterministic(lp, self.k())

    def unit_gates(self) -> Tensor:
        """The gate of each unit for the current forward: a sample in training, deterministic otherwise."""
        return self._gates_of(self.param, "_arm_u")

    def live_unit_gates(self) -> Tensor:
        """The live gate of each unit for the current forward (requires a live gate)."""
        return self._gates_of(self.live_param, "_arm_u_live")

    def _gates_of(self, param: Tensor, u_attr: str) -> Tensor:
        est = self.estimator
        if not self.training:
            return est.deterministic(param, self.k())
        if est.differentiable:
            return est.sample(param, self.k())
        pi = est.prob_open(param.detach(), self.k())
        if self._arm_antithetic:  # the antithetic pass reuses the u of the step's forward
            u = getattr(self, u_attr)
            if u is None:
                raise RuntimeError(f"{self.layer_name}: antithetic ARM pass without a preceding training forward")
            return (u > 1.0 - pi).to(pi.dtype)
        u = torch.rand_like(pi)
        setattr(self, u_attr, u)
        return (u < pi).to(pi.dtype)

    def group_masks(self, units: Tensor) -> dict[str, Tensor]:
        """Unit values ``[num_units]`` -> per-group tensors of the groups' shapes (differentiable)."""
        return self.plan.decode(units)

    # ---- hooks ---------------------------------------------------------------------------------
    def attach(self, layer: nn.Module) -> None:
        if self.has_live_gate:  # the live gate needs the layer's live-mask buffers (its own API registers them)
            for g in layer.mode_groups():
                if g.live is None:
                    layer.set_modes(g.name, g.mask.detach(), torch.ones_like(g.mask))
        self._handles = [
            layer.register_forward_pre_hook(self._pre_forward),
            layer.register_forward_hook(self._post_forward, always_call=True),
        ]

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_forward(self, layer: nn.Module, args) -> None:
        units = self.unit_gates()
        put: list[tuple[dict[str, str], Tensor]] = []  # (group -> buffer attribute, unit values)
        if self.has_live_gate:
            live = self.live_unit_gates()
            put = [(self.mask_attrs, units * live), (self.live_attrs, live)]  # D = z_d z_l, L = z_l
        else:
            put = [(self.mask_attrs, units)]
        if all(bool(((u == 0) | (u == 1)).all()) for _, u in put):
            # 0/1 gates (ARM, or hard concrete saturated by the clamp, where d z / d log_alpha = 0):
            # an ordinary mask -- copy it into the buffers, the layer takes its fast paths
            with torch.no_grad():
                for attrs, u in put:
                    for group, value in self.group_masks(u.detach()).items():
                        layer._buffers[attrs[group]].copy_(value)
            return
        # fractional gates: the layer must mix both copies, i.e. take its general path, which it
        # does for a mask that requires grad (without autograd recording: a leaf that does)
        for attrs, u in put:
            for group, value in self.group_masks(u).items():
                attr = attrs[group]
                buf = layer._buffers[attr]
                if not value.requires_grad:
                    value = value.detach().to(buf.dtype).requires_grad_(True)
                self._swapped[attr] = buf
                layer._buffers[attr] = value.to(buf.dtype)

    def _post_forward(self, layer: nn.Module, args, output) -> None:
        for attr, buf in self._swapped.items():
            layer._buffers[attr] = buf
        self._swapped = {}

    def extra_repr(self) -> str:
        return (f"layer={self.layer_name!r}, estimator={self.estimator_name!r}, granularity={self.granularity!r}, "
                f"units={self.num_units}, entries={self.num_entries}, live_gate={self.has_live_gate}")


class _ReverseGrad(torch.autograd.Function):
    """Identity whose gradient is negated: gradient *ascent* for Lagrange multipliers."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


# ----------------------------------------------------------------------------- the transform
class ModeGates(nn.Module):
    """Learned gates on the modes of every PAD layer of ``model``.

    Args:
        model: a model with (non-compact) PAD layers.
        target_ratio: kappa in (0, 1]: the fraction of entries to keep dynamic.
        granularity: ``"element"`` | ``"kernel"`` | ``"channel"`` (the IMP units).
        estimator: ``"hard_concrete"`` | ``"arm"``.
        scope: ``"global"`` (one budget over all layers) | ``"layer"`` (each layer).
        init: ``"open"`` (sparsify: gates start open, ``p_drop = 0.05``) |
            ``"hibernate"`` (expand: gates start closed, ``p_drop = 0.95``).
        init_drop: override the initial drop rate ``p`` (in (0, 1)).
        sharpness: the sharpness at the start (hard concrete ``1 / beta``,
            default 1.5; ARM ``k``, default 7).
        sharpness_end: the sharpness at the end of the schedule (defaults to
            ``sharpness``; with ``schedule="npn"`` the high value, default 100 x).
        schedule: ``"constant"`` | ``"linear"`` | ``"geometric"`` (start -> end over
            progress 0 -> 1) | ``"npn"`` (NPN's three stages: high until
            ``npn_stages[0]``, ``sharpness`` until ``npn_stages[1]``, then high).
        npn_stages: the two stage boundaries of ``"npn"`` as fractions of the schedule.
        init_noise: std of N(0, .) noise added to the initial parameters (breaks ties).
        seed: seed of that noise.
        density: ``None`` (no live gate: nothing is pruned) or a float in
            ``(0, 1]``, at least ``target_ratio``: a second gate ``z_l`` per unit
            (same estimator and units) decides live vs pruned, with its own
            budget (its own multipliers; one stored number per live entry)
            driving the expected live fraction to ``density``. The layer sees
            ``L = z_l`` and ``D = z_d * z_l``; hardening keeps exactly
            ``round(density * N)`` live entries, the dynamic ones among them.

    Use: add ``gates.penalty()`` to the loss, put :meth:`parameters` of the
    gates in the optimizer (:meth:`add_to_optimizer`), call :meth:`step` with the
    training progress, and with ARM call :meth:`arm_update_` after
    ``loss.backward()``; finally :meth:`harden_`. After :func:`padnet.load` of a
    gated model, :meth:`from_model` gives the controller back.
    """

    def __init__(
        self,
        model: nn.Module,
        target_ratio: float = 0.3,
        granularity: str = "element",
        estimator: str = "hard_concrete",
        scope: str = "global",
        init: str = "open",
        init_drop: float | None = None,
        sharpness: float | None = None,
        sharpness_end: float | None = None,
        schedule: str = "constant",
        npn_stages: tuple[float, float] = (0.2, 0.7),
        init_noise: float = 0.01,
        seed: int = 0,
        density: float | None = None,
    ) -> None:
        super().__init__()
        cfg = _validated_config(dict(
            target_ratio=target_ratio, granularity=granularity, estimator=estimator, scope=scope, init=init,
            init_drop=init_drop, sharpness=sharpness, sharpness_end=sharpness_end, schedule=schedule,
            npn_stages=npn_stages, init_noise=init_noise, seed=seed, density=density))
        est = get_estimator(cfg["estimator"])
        for name, module in model.named_modules():
            if is_compact_layer(module):
                raise ValueError(f"ModeGates: layer {name!r} is in compact (deploy) form; gates need the "
                                 "training form (attach them before compact_)")
            if isinstance(getattr(module, "mode_gate", None), LayerGate):
                raise ValueError(f"ModeGates: layer {name!r} already has gates attached "
                                 "(ModeGates.from_model(model) rebuilds their controller)")
        layers = [(n, m) for n, m in model.named_modules() if is_pad_layer(m)]
        if not layers:
            raise ValueError("ModeGates: the model has no PAD layers (run padnet.dynamize_ first)")
        self._set_config(cfg)
        # NPN: phi is initialised relative to the stochastic-phase sharpness
        k_init = self.sharpness_start
        k0 = self.sharpness_at(0.0)
        gen = torch.Generator().manual_seed(self.seed)
        gates: list[tuple[str, nn.Module, LayerGate]] = []
        for name, layer in layers:
            plan_units = LayerPlan(name, layer, self.granularity).num_units
            init_t = torch.full((plan_units,), est.init_value(self.init_drop, k_init))
            if self.init_noise > 0:
                init_t += self.init_noise * torch.randn(plan_units, generator=gen) / (
                    k_init if self.estimator_name == "arm" else 1.0)
            live_t = None
            if self.density is not None:  # the live gate starts open (p_drop = 0.05): pruning is learned
                live_t = torch.full((plan_units,), est.init_value(0.05, k_init))
                if self.init_noise > 0:
                    live_t += self.init_noise * torch.randn(plan_units, generator=gen) / (
                        k_init if self.estimator_name == "arm" else 1.0)
            gates.append((name, layer, LayerGate(name, layer, self.granularity, self.estimator_name, init_t, k0,
                                                 live_init=live_t)))
        for name, layer, gate in gates:  # all built: now change the model
            layer.add_module("mode_gate", gate)
            gate.attach(layer)
        self._finish(model, gates)
        get_state(model).append("gates", config=self.config(),
                                layers=[[name, gate.num_units] for name, _, gate in gates])

    def _set_config(self, cfg: dict[str, Any]) -> None:
        self.target_ratio = cfg["target_ratio"]
        self.granularity = cfg["granularity"]
        self.estimator_name = cfg["estimator"]
        self.scope = cfg["scope"]
        self.init = cfg["init"]
        self.init_drop = cfg["init_drop"]
        self.schedule = cfg["schedule"]
        self.sharpness_start = cfg["sharpness"]
        self.sharpness_end = cfg["sharpness_end"]
        self.npn_stages = tuple(cfg["npn_stages"])
        self.init_noise = cfg["init_noise"]
        self.seed = cfg["seed"]
        self.density = cfg["density"]

    def _finish(self, model: nn.Module, gates: list[tuple[str, nn.Module, "LayerGate"]]) -> None:
        """The controller's own state around attached gates: multipliers, progress, layer costs."""
        self.__dict__["_layers"] = gates
        self.__dict__["_model"] = model
        ref = gates[0][2].param
        n_budgets = 1 if self.scope == "global" else len(gates)
        self.multipliers = nn.Parameter(torch.zeros(n_budgets, 2, device=ref.device, dtype=torch.float32))
        if self.density is not None:  # the live gate's own budget
            self.live_multipliers = nn.Parameter(torch.zeros(n_budgets, 2, device=ref.device, dtype=torch.float32))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64, device=ref.device))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool, device=ref.device))
        cost = torch.tensor([float(g.num_factors - 1) for _, _, g in gates], dtype=torch.float32)
        if float(cost.sum()) == 0:
            cost = torch.ones_like(cost)  # K = 1 everywhere: charge entries equally
        self.register_buffer("layer_cost", cost.to(ref.device), persistent=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModeGates":
        """The controller of the gates attached to ``model`` (e.g. after :func:`padnet.load` of a gated model).

        Rebuilt from the model's last ``"gates"`` step of the transform record
        around the attached :class:`LayerGate` modules (their parameters and
        sharpness came with the model's state dict); nothing is re-initialised
        and no step is recorded. The multipliers and the schedule progress are
        the controller's own state: restore them with ``load_state_dict`` (the
        trainer checkpoint stores it). Raises ``ValueError`` if the model has
        no recorded gates, they were hardened or removed, or the attached gates
        do not match the record.
        """
        state = find_state(model)
        steps = state.steps if state is not None else []
        last = max((i for i, st in enumerate(steps) if st.op == "gates"), default=None)
        if last is None:
            raise ValueError("ModeGates.from_model: the model's transform record has no 'gates' step "
                             "(attach gates with ModeGates(model, ...))")
        if any(st.op == "harden_gates" for st in steps[last + 1:]):
            raise ValueError("ModeGates.from_model: the model's gates were hardened (or removed); "
                             "its masks are fixed, there is nothing to resume")
        params = steps[last].params
        cfg = _validated_config(params.get("config"))
        gates: list[tuple[str, nn.Module, LayerGate]] = []
        for name, units in _check_layers(params.get("layers")):
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"ModeGates.from_model: recorded gated layer {name!r} is not in the model") from None
            gate = layer._modules.get("mode_gate")
            if not isinstance(gate, LayerGate):
                raise ValueError(f"ModeGates.from_model: layer {name!r} has no LayerGate attached")
            if gate.num_units != units or gate.granularity != cfg["granularity"] \
                    or gate.estimator_name != cfg["estimator"] or gate.has_live_gate != (cfg["density"] is not None):
                raise ValueError(f"ModeGates.from_model: the gate of layer {name!r} ({gate.extra_repr()}) does not "
                                 f"match the record ({units} units, {cfg['granularity']}, {cfg['estimator']})")
            gates.append((name, layer, gate))
        if not gates:
            raise ValueError("ModeGates.from_model: the recorded 'gates' step lists no layers")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_config(cfg)
        self._finish(model, gates)
        return self

    # ---- access -------------------------------------------------------------------------------
    def layer_gates(self) -> Iterator[tuple[str, LayerGate]]:
        self._check_not_hardened()
        for name, _, gate in self.__dict__["_layers"]:
            yield name, gate

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-unit gate parameters (they live in the model, under ``<layer>.mode_gate``)."""
        out = [g.param for _, g in self.layer_gates()]
        return out + [g.live_param for _, g in self.layer_gates() if g.live_param is not None]

    def budget_parameters(self) -> list[nn.Parameter]:
        """The Lagrange multipliers: the dynamic budget's, then the live budget's (with ``density``)."""
        return [self.multipliers] + ([self.live_multipliers] if self.density is not None else [])

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``ModeGates(model, **gates.config())`` rebuilds."""
        return {
            "target_ratio": self.target_ratio, "granularity": self.granularity, "estimator": self.estimator_name,
            "scope": self.scope, "init": self.init, "init_drop": self.init_drop, "sharpness": self.sharpness_start,
            "sharpness_end": self.sharpness_end, "schedule": self.schedule, "npn_stages": list(self.npn_stages),
            "init_noise": self.init_noise, "seed": self.seed, "density": self.density,
        }

    def add_to_optimizer(self, optimizer: torch.optim.Optimizer, lr: float | None = None) -> dict[str, Any]:
        """Move the gate parameters and multipliers into one new param group (no weight decay).

        They are removed from any group that already holds them (e.g. one
        built from ``model.parameters()``). Returns the new group.
        """
        self._check_not_hardened()
        mine = self.gate_parameters() + self.budget_parameters()
        ids = {id(p) for p in mine}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        group: dict[str, Any] = {"params": mine, "weight_decay": 0.0}
        if lr is not None:
            _check_positive(lr, "lr")
            group["lr"] = float(lr)
        optimizer.add_param_group(group)
        return optimizer.param_groups[-1]

    def build_optimizer(self, lr: float = 0.05, multiplier_lr: float | None = None,
                        betas: tuple[float, float] = (0.5, 0.999)) -> torch.optim.Adam:
        """A separate Adam for the gates (as in the L0 / structured-pruning recipes): ``lr`` for the
        gate parameters (a step in logit space: ARM's ``phi`` gets ``lr / sharpness``, since its
        logit is ``k * phi``), ``multiplier_lr`` (default ``lr``) for the multipliers. ``beta1 = 0.5``
        (less momentum than Adam's 0.9) damps the overshoot of the expected ratio around the target:
        Adam moves every gate at about ``lr`` per step whatever the multiplier's size. Remove the gate
        parameters from the model optimizer with :meth:`remove_from_optimizer`."""
        _check_positive(lr, "lr")
        mlr = lr if multiplier_lr is None else multiplier_lr
        _check_positive(mlr, "multiplier_lr")
        self._check_not_hardened()
        # ARM's logit is k * phi: scale phi's step so that ``lr`` is a step in logit space
        gate_lr = float(lr) / self.sharpness_start if self.estimator_name == "arm" else float(lr)
        return torch.optim.Adam([{"params": self.gate_parameters(), "lr": gate_lr},
                                 {"params": self.budget_parameters(), "lr": float(mlr)}], betas=betas)

    def remove_from_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gate parameters and multipliers (and their state) from ``optimizer``'s groups."""
        _forget_params(optimizer, self.gate_parameters() + self.budget_parameters())

    # ---- sharpness schedule ---------------------------------------------------------------
    def sharpness_at(self, progress: float) -> float:
        """Sharpness at ``progress`` in [0, 1] of the schedule."""
        t = min(max(float(progress), 0.0), 1.0)
        s0, s1 = self.sharpness_start, self.sharpness_end
        if self.schedule == "constant":
            return s0
        if self.schedule == "linear":
            return s0 + (s1 - s0) * t
        if self.schedule == "geometric":
            return s0 * (s1 / s0) ** t
        a, b = self.npn_stages  # npn: high -> low -> high
        return s1 if (t < a or t >= b) else s0

    def step(self, progress: float) -> float:
        """Set every layer's sharpness for ``progress`` in [0, 1]; returns it."""
        if not math.isfinite(float(progress)):
            raise ValueError(f"progress must be finite, got {progress!r}")
        s = self.sharpness_at(progress)
        self.progress.fill_(float(progress))
        self.set_sharpness(s)
        return s

    def set_sharpness(self, value: float) -> None:
        value = _check_sharpness(value, "sharpness")
        for _, g in self.layer_gates():
            g.sharpness.fill_(value)

    @property
    def sharpness(self) -> float:
        return next(g for _, g in self.layer_gates()).k()

    # ---- budget ---------------------------------------------------------------------------
    def _expected(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per layer: expected dynamic entries ``[L]``, entries ``[L]``, cost weight ``[L]``."""
        exp = torch.stack([g.expected_dynamic() for _, g in self.layer_gates()])
        n = torch.tensor([float(g.num_entries) for _, g in self.layer_gates()], device=exp.device)
        return exp, n, self.layer_cost.to(exp.device)

    def penalty(self) -> Tensor:
        """Lagrangian budget term (0-d, differentiable) to add to the training loss.

        With ``c`` the expected deployable extra cost as a fraction of the fully
        dynamic one -- every dynamic entry costs its layer's ``K - 1`` extra
        numbers: ``c = sum_l (K_l - 1) E[n_l] / sum_l (K_l - 1) N_l`` (``scope="global"``)
        or ``c_l = E[n_l] / N_l`` (``scope="layer"``) -- the term is
        ``sum_b lambda_b1 * (c_b - t) + lambda_b2 * (c_b - t)^2``; the multipliers
        ``lambda`` get the negated gradient (ascent), the gates the ordinary one.
        With ``density`` a second term of the same form, with its own multipliers
        ``live_multipliers``, drives the expected live fraction (every live entry
        stores one number: ``sum_l E[live_l] / sum_l N_l``, or per layer) to ``density``.
        """
        exp, n, cost = self._expected()
        if self.scope == "global":
            gap = ((cost * exp).sum() / (cost * n).sum() - self.target_ratio).reshape(1)
        else:
            gap = exp / n - self.target_ratio
        lam = _ReverseGrad.apply(self.multipliers)
        total = (lam[:, 0] * gap + lam[:, 1] * gap * gap).sum()
        if self.density is not None:  # the live budget: every live entry stores one number
            live = torch.stack([g.expected_live() for _, g in self.layer_gates()])
            live_gap = (live.sum() / n.sum() - self.density).reshape(1) if self.scope == "global" \
                else live / n - self.density
            lam_l = _ReverseGrad.apply(self.live_multipliers)
            total = total + (lam_l[:, 0] * live_gap + lam_l[:, 1] * live_gap * live_gap).sum()
        return total

    @torch.no_grad()
    def stats(self) -> dict[str, Any]:
        """Expected dynamic ratio (global and per layer), cost fraction, gate entropy (bits), multipliers."""
        exp, n, cost = self._expected()
        ent_sum = 0.0
        units = 0
        for _, g in self.layer_gates():
            p = g.prob_open().double().clamp(1e-12, 1 - 1e-12)
            ent_sum += float((-(p * p.log2() + (1 - p) * (1 - p).log2())).sum())
            units += p.numel()
        names = [name for name, _ in self.layer_gates()]
        return {
            "expected_ratio": float(exp.sum() / n.sum()),
            "expected_cost_fraction": float((cost * exp).sum() / (cost * n).sum()),
            "layer_ratios": {nm: float(e / m) for nm, e, m in zip(names, exp, n)},
            "entropy": ent_sum / max(units, 1),
            "penalty": float(self.penalty()),
            "sharpness": self.sharpness,
            "multipliers": self.multipliers.detach().cpu().tolist(),
            "target_ratio": self.target_ratio,
            **self._live_stats(n, names),
        }

    def _live_stats(self, n: Tensor, names: list[str]) -> dict[str, Any]:
        if self.density is None:
            return {}
        live = torch.stack([g.expected_live() for _, g in self.layer_gates()])
        return {"expected_density": float(live.sum() / n.sum()),
                "layer_densities": {nm: float(e / m) for nm, e, m in zip(names, live, n)},
                "live_multipliers": self.live_multipliers.detach().cpu().tolist(), "density": self.density}

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming every layer whose gate parameters are not finite."""
        bad = [name for name, g in self.layer_gates() if not bool(torch.isfinite(g.param).all())
               or (g.live_param is not None and not bool(torch.isfinite(g.live_param).all()))]
        if bad:
            raise FloatingPointError(f"ModeGates: non-finite gate parameters in layer(s) {bad} "
                                     "(lower the gate learning rate)")
        if not all(bool(torch.isfinite(m).all()) for m in self.budget_parameters()):
            raise FloatingPointError("ModeGates: non-finite Lagrange multipliers")

    # ---- ARM -----------------------------------------------------------------------------------
    def arm_update_(self, loss: Tensor | float, closure: Callable[[], Tensor]) -> None:
        """ARM gradient for ``phi`` (call after ``loss.backward()``; ARM only).

        ``loss``: the loss ``f(z)`` of the step's forward pass (which drew
        ``u`` and used ``z = 1[u < pi]``); ``closure()`` must run the same
        forward on the same batch and return the loss: it runs under
        ``no_grad`` with the antithetic gates ``z' = 1[u > 1 - pi]``. Adds
        ``k * (f(z') - f(z)) * (u - 1/2)`` to ``phi.grad`` (all-reduced over
        the default process group when one is initialised) and clears ``u``.
        """
        if self.estimator_name != "arm":
            raise ValueError(f"arm_update_ needs estimator='arm', these gates use {self.estimator_name!r}")
        gates = [g for _, g in self.layer_gates()]
        if any(g._arm_u is None for g in gates):
            raise RuntimeError("arm_update_: run the training forward pass first (no gate sample drawn)")
        f = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        try:
            for g in gates:
                g._arm_antithetic = True
            with torch.no_grad():
                f_anti = float(closure())
        finally:
            for g in gates:
                g._arm_antithetic = False
        if not (math.isfinite(f) and math.isfinite(f_anti)):
            self.check_finite()
            raise FloatingPointError(f"arm_update_: loss is not finite (f={f}, antithetic f={f_anti})")
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        for g in gates:
            pairs = [(g.param, g._arm_u)]
            if g.has_live_gate:  # the live gate's u drew its samples in the same forward
                if g._arm_u_live is None:
                    raise RuntimeError(f"arm_update_: layer {g.layer_name!r}: no live gate sample drawn")
                pairs.append((g.live_param, g._arm_u_live))
            for p, u in pairs:
                grad = g.k() * (f_anti - f) * (u - 0.5)
                if dist:
                    torch.distributed.all_reduce(grad)
                    grad /= torch.distributed.get_world_size()
                p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad.to(p.dtype)
            g._arm_u = None
            g._arm_u_live = None

    # ---- hardening -------------------------------------------------------------------------
    @torch.no_grad()
    def hard_masks(self) -> dict[tuple[str, str], Tensor]:
        """The 0/1 masks hardening would write: top-k units by gate probability, exactly the target.

        Global scope: ``round(t * N)`` entries over all layers (exact for element
        units, to one unit's size for structured ones); layer scope: per layer.
        With ``density`` only live units (:meth:`hard_live_masks`) can be dynamic.
        """
        gates = [(name, g) for name, g in self.layer_gates()]
        probs = [g.prob_open().float() + 1e-6 * g.deterministic_units().float() for _, g in gates]
        live = self._hard_live_units() if self.density is not None else None
        return self._masks_of(gates, self._top_units(gates, probs, self.target_ratio, live))

    @torch.no_grad()
    def hard_live_masks(self) -> dict[tuple[str, str], Tensor]:
        """The 0/1 live masks hardening would write (``density`` only): top-k units by live
        probability, ``round(density * N)`` entries (global) or per layer."""
        if self.density is None:
            raise ValueError("hard_live_masks: these gates have no live gate (ModeGates(density=...))")
        return self._masks_of([(name, g) for name, g in self.layer_gates()], self._hard_live_units())

    def _hard_live_units(self) -> list[Tensor]:
        gates = [(name, g) for name, g in self.layer_gates()]
        probs = [g.live_prob_open().float() + 1e-6 * g.deterministic_live_units().float() for _, g in gates]
        return self._top_units(gates, probs, self.density, None)

    def _top_units(self, gates: list[tuple[str, LayerGate]], probs: list[Tensor], ratio: float,
                   within: list[Tensor] | None) -> list[Tensor]:
        """Bool ``[num_units]`` per layer: the top units by ``probs`` holding ``round(ratio * N)`` entries
        (global or per layer); with ``within`` only among those units."""
        sizes = [g.unit_sizes for _, g in gates]
        structured = self.granularity != "element"
        if within is not None:  # units outside rank below every unit inside (and are never kept)
            probs = [torch.where(w, p, torch.full_like(p, -1.0)) for p, w in zip(probs, within)]
        keeps: list[Tensor] = []
        if self.scope == "global":
            total = sum(g.num_entries for _, g in gates)
            flat_within = None if within is None else torch.cat(within)
            keep = select_top(torch.cat(probs), torch.cat(sizes) if structured else None,
                              round_half_up(ratio * total), flat_within)
            offset = 0
            for p in probs:
                keeps.append(keep[offset: offset + p.numel()])
                offset += p.numel()
        else:
            for i, ((_, g), p, s) in enumerate(zip(gates, probs, sizes)):
                keeps.append(select_top(p, s if structured else None, round_half_up(ratio * g.num_entries),
                                        None if within is None else within[i]))
        if within is not None:  # structured rounding may overshoot the live units: never dynamic if pruned
            keeps = [k & w for k, w in zip(keeps, within)]
        return keeps

    @staticmethod
    def _masks_of(gates: list[tuple[str, LayerGate]], keeps: list[Tensor]) -> dict[tuple[str, str], Tensor]:
        out: dict[tuple[str, str], Tensor] = {}
        for (name, g), keep in zip(gates, keeps):
            for group, m in g.group_masks(keep.float()).items():
                out[(name, group)] = m.bool()
        return out

    @torch.no_grad()
    def harden_(self, optimizer: torch.optim.Optimizer | None = None,
                routing_means: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Deterministic gates -> 0/1 masks with exactly the target ratio; the gates are removed.

        The function is kept, in two steps. (1) The gated layer is rewritten as
        a 0/1-masked one: every entry with deterministic gate ``0 < z < 1`` becomes
        dynamic with ``W_k := z W_k + (1 - z) (lambda_s / lambda_d) W_s / total``
        (exact for softmax routing and MoE, where ``total = 1``), entries with
        ``z = 1`` dynamic, ``z = 0`` static, unchanged. (2) The masks go to
        :meth:`hard_masks` through the function-preserving transitions
        (:func:`padnet.transforms.transitions.set_modes_`): entries that turn
        static get ``W_s := (lambda_d / lambda_s) sum_k pbar_k W_k`` with ``pbar``
        the running mean routing weights (or ``routing_means[layer]``), entries
        that turn dynamic ``W_k := (lambda_s / lambda_d) W_s / total``. With
        ``optimizer``, the gate parameters and multipliers leave it and the
        moments of every rewritten entry are reset. Everything is validated
        before anything changes. Returns a report (achieved ratios, transition
        counts per layer).
        """
        from .transitions import reset_optimizer_state_, set_modes_

        self._check_not_hardened()
        self.check_finite()
        layers = self.__dict__["_layers"]
        names = {name for name, _, _ in layers}
        routing_means = dict(routing_means or {})
        unknown = set(routing_means) - names
        if unknown:
            raise KeyError(f"routing_means for unknown layer(s) {sorted(unknown)}; gated layers: {sorted(names)}")
        masks = self.hard_masks()
        live_masks = self.hard_live_masks() if self.density is not None else {}
        # ---- validate everything first (nothing is half-applied)
        plans = []
        for name, layer, gate in layers:
            z = {k: v.detach() for k, v in gate.group_masks(gate.deterministic_units()).items()}
            z_live = {k: v.detach() for k, v in gate.group_masks(gate.deterministic_live_units()).items()}
            lambda_s, lambda_d = (float(s) for s in layer.scales())
            if not (math.isfinite(lambda_s) and math.isfinite(lambda_d) and lambda_s != 0 and lambda_d != 0):
                raise ValueError(f"layer {name!r}: lambda_s={lambda_s}, lambda_d={lambda_d}; hardening folds the "
                                 "gates into the weights and divides by both (reset layer.scale.phi)")
            if name in routing_means:
                mix, total = _check_mix(name, layer, routing_means[name])
            else:
                mix, total = layer.mode_transition_weights()  # raises naming the layer on bad statistics
            plans.append((name, layer, gate, z, z_live, lambda_s / lambda_d, float(total)))
        # ---- (1) gates -> 0/1 masks with the same function
        blended = 0
        for name, layer, gate, z, z_live, ratio_sd, total in plans:
            gate.detach_hooks()
            for g in layer.mode_groups():  # the buffers again (hooks gone)
                zg = z[g.name].to(device=g.static.device, dtype=g.static.dtype)
                frac = (zg > 0) & (zg < 1)
                if bool(frac.any()):
                    new_dyn = zg * g.dynamic + (1 - zg) * (ratio_sd / total) * g.static
                    g.dynamic.copy_(torch.where(frac.unsqueeze(0), new_dyn, g.dynamic))
                    blended += int(frac.sum())
                    if optimizer is not None:
                        reset_optimizer_state_(optimizer, g.dynamic, frac.unsqueeze(0))
                if gate.has_live_gate:
                    # W_hat = z_l * (the z_d-gated weight): fold z_l into both copies (z_l = 0 entries become
                    # zeros) and mark everything live, so (2) transitions modes freely and (3) prunes
                    zl = z_live[g.name].to(device=g.static.device, dtype=g.static.dtype)
                    scaled = zl < 1
                    g.static.mul_(zl)
                    g.dynamic.mul_(zl.unsqueeze(0))
                    if optimizer is not None and bool(scaled.any()):
                        reset_optimizer_state_(optimizer, g.static, scaled)
                        reset_optimizer_state_(optimizer, g.dynamic, scaled.unsqueeze(0))
                    layer.set_modes(g.name, zg > 0, torch.ones_like(g.mask))
                else:
                    g.mask.copy_((zg > 0).to(g.mask.dtype))
            del layer._modules["mode_gate"]
        if optimizer is not None:
            _forget_params(optimizer, self.gate_parameters() + self.budget_parameters())
        self.hardened.fill_(True)
        # ---- (2) 0/1 masks -> the target masks, function-preserving
        spec: dict[str, dict[str, Tensor]] = {}
        for (name, group), m in masks.items():
            spec.setdefault(name, {})[group] = m
        routing = {n: torch.as_tensor(v, dtype=torch.float64) for n, v in routing_means.items()}
        transition = set_modes_(self.__dict__["_model"], spec, preserve=True, optimizer=optimizer,
                                routing=routing or None, record=False)  # in the harden_gates step
        # ---- (3) with a live gate: prune to the live masks (pruned values and their optimizer state -> 0)
        for name, layer, *_ in plans:
            for g in layer.mode_groups() if live_masks else ():
                live = live_masks[(name, g.name)].to(g.mask.device)
                layer.set_modes(g.name, masks[(name, g.name)].to(g.mask.device), live)
                dead = ~live
                g.static.data[dead] = 0
                g.dynamic.data[:, dead] = 0
                if optimizer is not None:
                    reset_optimizer_state_(optimizer, g.static, dead)
                    reset_optimizer_state_(optimizer, g.dynamic, dead.unsqueeze(0))
        report: dict[str, Any] = {"target_ratio": self.target_ratio, "fractional_gates_folded": blended,
                                  "transitions": transition.to_dict(), "layers": {}}
        if live_masks:
            n_live = sum(int(m.sum()) for m in live_masks.values())
            report["density"] = n_live / max(sum(m.numel() for m in live_masks.values()), 1)
            report["layer_densities"] = {name: layer.density() for name, layer, *_ in plans}
        dyn_total = entries_total = 0
        for name, layer, *_ in plans:
            n_dyn = sum(int(masks[(name, g.name)].sum()) for g in layer.mode_groups())
            n_all = sum(g.mask.numel() for g in layer.mode_groups())
            dyn_total += n_dyn
            entries_total += n_all
            report["layers"][name] = n_dyn / max(n_all, 1)
        report["ratio"] = dyn_total / max(entries_total, 1)
        extra = {"density": self.density, "achieved_density": report["density"]} if live_masks else {}
        get_state(self.__dict__["_model"]).append(
            "harden_gates", mode="harden", target_ratio=self.target_ratio, ratio=report["ratio"],
            fractional_gates_folded=blended, transition=transition.summary(), **extra)
        return report

    def remove_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take the gates off without touching weights or mask buffers (e.g. before loading a model
        checkpointed after hardening). The parameters leave ``optimizer``; the gates count as done."""
        self._check_not_hardened()
        layers = self.__dict__["_layers"]
        if optimizer is not None:
            _forget_params(optimizer, self.gate_parameters() + self.budget_parameters())
        for _, layer, gate in layers:
            gate.detach_hooks()
            del layer._modules["mode_gate"]
        self.hardened.fill_(True)
        get_state(self.__dict__["_model"]).append("harden_gates", mode="remove")

    def _check_not_hardened(self) -> None:
        if bool(self.hardened):
            raise RuntimeError("ModeGates: the gates were already hardened (harden_ can run once; "
                               "the masks are fixed now)")

    def extra_repr(self) -> str:
        return (f"target_ratio={self.target_ratio}, density={self.density}, estimator={self.estimator_name!r}, "
                f"granularity={self.granularity!r}, scope={self.scope!r}, layers={len(self.__dict__['_layers'])}")


# ----------------------------------------------------------------------------- the transform record
# "gates" (params: {"config": ModeGates.config(), "layers": [[layer_name, num_units], ...]}) is replayed
# by padnet.load: the LayerGate modules are re-attached (zero-initialised: their parameters and sharpness
# come from the file) -- unless a later "harden_gates" step (params: {"mode": "harden" | "remove",
# totals}; provenance) took them off: then the replay skips (nothing is built, the file holds the
# hardened masks and weights and no gate tensors). Each "gates" step is checked against the file before
# any model is built (_check_gates_step).
_CONFIG_KEYS = ("target_ratio", "granularity", "estimator", "scope", "init", "init_drop", "sharpness",
                "sharpness_end", "schedule", "npn_stages", "init_noise", "seed", "density")
MAX_GATED_LAYERS = 100_000


def _validated_config(cfg: Any) -> dict[str, Any]:
    """The ModeGates options, validated and resolved (defaults filled in); ``ValueError`` naming the option."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"gate config must be an object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown gate config keys {unknown}")
    estimator = cfg.get("estimator", "hard_concrete")
    if not isinstance(estimator, str):
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {tuple(ESTIMATORS)}")
    est = get_estimator(estimator)
    target_ratio = _check_ratio(cfg.get("target_ratio", 0.3))
    granularity, scope = cfg.get("granularity", "element"), cfg.get("scope", "global")
    init, schedule = cfg.get("init", "open"), cfg.get("schedule", "constant")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    sharpness = cfg.get("sharpness")
    sharpness = _check_sharpness(est.default_sharpness if sharpness is None else sharpness, "sharpness")
    sharpness_end = cfg.get("sharpness_end")
    if sharpness_end is None:
        sharpness_end = 100.0 * sharpness if schedule == "npn" else sharpness
    sharpness_end = _check_sharpness(sharpness_end, "sharpness_end")
    p_drop = cfg.get("init_drop")
    p_drop = (0.05 if init == "open" else 0.95) if p_drop is None else p_drop
    if isinstance(p_drop, bool) or not (isinstance(p_drop, (int, float)) and 0.0 < p_drop < 1.0):
        raise ValueError(f"init_drop must be in (0, 1), got {p_drop!r}")
    stages = cfg.get("npn_stages", (0.2, 0.7))
    if not isinstance(stages, (tuple, list)) or len(stages) != 2 \
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in stages):
        raise ValueError(f"npn_stages must be two numbers, got {stages!r}")
    a, b = (float(x) for x in stages)
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"npn_stages must satisfy 0 <= a <= b <= 1, got {stages!r}")
    init_noise = cfg.get("init_noise", 0.01)
    if isinstance(init_noise, bool) or not isinstance(init_noise, (int, float)) \
            or not (math.isfinite(init_noise) and init_noise >= 0):
        raise ValueError(f"init_noise must be a finite number >= 0, got {init_noise!r}")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    density = cfg.get("density")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) \
                or not 0.0 < density <= 1.0:
            raise ValueError(f"density must be None or a number in (0, 1], got {density!r}")
        if density < target_ratio:
            raise ValueError(f"density={density} < target_ratio={target_ratio}: a pruned entry cannot be "
                             "dynamic, so the live fraction must be at least the dynamic one")
        density = float(density)
    return {"target_ratio": target_ratio, "granularity": granularity, "estimator": estimator, "scope": scope,
            "init": init, "init_drop": float(p_drop), "sharpness": sharpness, "sharpness_end": sharpness_end,
            "schedule": schedule, "npn_stages": [a, b], "init_noise": float(init_noise), "seed": int(seed),
            "density": density}


def _check_layers(layers: Any) -> list[tuple[str, int]]:
    """``[[layer_name, num_units], ...]`` of a "gates" step; ``ValueError`` naming the bad entry."""
    if not isinstance(layers, list) or not layers or len(layers) > MAX_GATED_LAYERS:
        raise ValueError(f"gates step 'layers' must be a non-empty list of [layer_name, num_units] "
                         f"(at most {MAX_GATED_LAYERS}), got {type(layers).__name__}")
    out, seen = [], set()
    for entry in layers:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] > 0):
            raise ValueError(f"gates step 'layers': bad entry {entry!r} (expected [layer_name, num_units > 0])")
        if entry[0] in seen:
            raise ValueError(f"gates step 'layers': layer {entry[0]!r} listed twice")
        seen.add(entry[0])
        out.append((entry[0], entry[1]))
    return out


def _removed_later(ctx: ReplayContext) -> bool:
    """Whether the "gates" step at ``ctx.index`` was hardened or removed by a later "harden_gates" step."""
    steps = ctx.metadata["state"]["steps"]
    for step in steps[ctx.index + 1:]:
        if step["op"] in ("gates", "harden_gates"):
            return step["op"] == "harden_gates"
    return False


def _check_gates_step(params: dict, ctx: ReplayContext) -> None:
    """Before anything is built: the config is valid and the file holds each gate's tensors, of the recorded size."""
    unknown = sorted(set(params) - {"config", "layers"})
    if unknown:
        raise ValueError(f"gates step: unknown params {unknown}")
    cfg = _validated_config(params.get("config"))
    param_name = get_estimator(cfg["estimator"]).param_name
    layers = _check_layers(params.get("layers"))
    if _removed_later(ctx):
        return  # hardened: not replayed, the file holds no gate tensors
    names = [param_name] + (["live_" + param_name] if cfg["density"] is not None else [])
    for name, units in layers:
        for pn in names:
            key = f"{name}.mode_gate.{pn}"
            t = ctx.tensors.get(key)
            if t is None:
                raise ValueError(f"gates step: layer {name!r} is gated but the file has no tensor {key!r}")
            if tuple(t.shape) != (units,):
                raise ValueError(f"gates step: tensor {key!r} has shape {tuple(t.shape)}, the record says "
                                 f"({units},) units")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"gates step: tensor {key!r} holds NaN/inf")
        k = ctx.tensors.get(f"{name}.mode_gate.sharpness")
        if k is None or k.dim() != 0 or not (math.isfinite(float(k)) and float(k) > 0):
            raise ValueError(f"gates step: layer {name!r}: the file's gate sharpness is missing or not a "
                             "finite number > 0")


def _replay_gates(model: nn.Module, params: dict, ctx: ReplayContext) -> None:
    """Re-attach the recorded gates (zero parameters; the state dict fills them). Validates all first."""
    if _removed_later(ctx):
        return
    cfg = _validated_config(params["config"])
    built: list[tuple[nn.Module, LayerGate]] = []
    for name, units in _check_layers(params["layers"]):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"gates step: gated layer {name!r} is not in the rebuilt model") from None
        if not is_pad_layer(layer) or is_compact_layer(layer):
            raise ValueError(f"gates step: {name!r} is a {type(layer).__name__}, not a PAD layer in training form")
        if isinstance(layer._modules.get("mode_gate"), LayerGate):
            raise ValueError(f"gates step: layer {name!r} already has gates attached")
        plan_units = LayerPlan(name, layer, cfg["granularity"]).num_units
        if plan_units != units:
            raise ValueError(f"gates step: layer {name!r} has {plan_units} {cfg['granularity']} units, "
                             f"the record says {units}")
        live_init = torch.zeros(units) if cfg["density"] is not None else None
        built.append((layer, LayerGate(name, layer, cfg["granularity"], cfg["estimator"], torch.zeros(units),
                                       cfg["sharpness"], live_init=live_init)))
    for layer, gate in built:  # all built: now change the model
        layer.add_module("mode_gate", gate)
        gate.attach(layer)


def _check_harden_step(params: dict, ctx: ReplayContext) -> None:
    if params.get("mode") not in ("harden", "remove"):
        raise ValueError(f"harden_gates step: mode must be 'harden' or 'remove', got {params.get('mode')!r}")
    steps = ctx.metadata["state"]["steps"]
    before = [s["op"] for s in steps[: ctx.index] if s["op"] in ("gates", "harden_gates")]
    if not before or before[-1] != "gates":
        raise ValueError("harden_gates step without gates attached before it")


register_op("gates", _replay_gates, check=_check_gates_step)
register_op("harden_gates", check=_check_harden_step)


# ----------------------------------------------------------------------------- helpers
def _check_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"target_ratio must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_sharpness(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_mix(name: str, layer: nn.Module, given: Any) -> tuple[Tensor, Tensor]:
    from ..layers.modes import transition_weights

    k = layer.mode_groups()[0].num_factors
    if not isinstance(given, Tensor) or tuple(given.shape) != (k,):
        got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
        raise ValueError(f"routing_means[{name!r}]: expected a tensor of shape ({k},), got {got}")
    return transition_weights(given, bool(layer.routing_sums_to_one or layer.routing_normalize_mix),
                              f"routing_means[{name!r}]")


def _forget_params(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)
