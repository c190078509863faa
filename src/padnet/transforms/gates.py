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
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..layers.modes import is_compact_layer, is_pad_layer
from .partition.units import GRANULARITIES, LayerPlan, round_half_up, select_top

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
    ``sharpness``: 0-d buffer (saved). The gate hooks itself into the layer it
    was built for (:meth:`attach`).
    """

    def __init__(self, layer_name: str, layer: nn.Module, granularity: str, estimator: str, init: Tensor,
                 sharpness: float) -> None:
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
        self.register_buffer("sharpness", torch.tensor(float(sharpness), dtype=torch.float32, device=ref.device))
        _, sizes = plan.unit_sums({g.name: torch.ones(g.shape) for g in plan.groups}, torch.float32)
        self.register_buffer("unit_sizes", sizes.to(ref.device), persistent=False)
        self.num_factors = int(ref.shape[0])
        # group name -> mask attribute of the layer
        buffers = {id(b): n for n, b in layer.named_buffers(recurse=False)}
        self.mask_attrs = {g.name: buffers[id(g.mask)] for g in plan.groups}
        self._handles: list[Any] = []
        self._swapped: dict[str, Tensor] = {}
        self._arm_u: Tensor | None = None
        self._arm_antithetic = False

    # ---- parameters and probabilities --------------------------------------------------------
    @property
    def estimator(self):
        return ESTIMATORS[self.estimator_name]

    @property
    def param(self) -> Tensor:
        return getattr(self, self.estimator.param_name)

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

    def expected_dynamic(self) -> Tensor:
        """Expected number of dynamic entries (0-d, differentiable)."""
        return (self.prob_open() * self.unit_sizes).sum()

    def deterministic_units(self) -> Tensor:
        return self.estimator.deterministic(self.param, self.k())

    def unit_gates(self) -> Tensor:
        """The gate of each unit for the current forward: a sample in training, deterministic otherwise."""
        est = self.estimator
        if not self.training:
            return self.deterministic_units()
        if est.differentiable:
            return est.sample(self.param, self.k())
        pi = est.prob_open(self.param.detach(), self.k())
        if self._arm_antithetic:  # the antithetic pass reuses the u of the step's forward
            if self._arm_u is None:
                raise RuntimeError(f"{self.layer_name}: antithetic ARM pass without a preceding training forward")
            return (self._arm_u > 1.0 - pi).to(pi.dtype)
        self._arm_u = torch.rand_like(pi)
        return (self._arm_u < pi).to(pi.dtype)

    def group_masks(self, units: Tensor) -> dict[str, Tensor]:
        """Unit values ``[num_units]`` -> per-group tensors of the groups' shapes (differentiable)."""
        return self.plan.decode(units)

    # ---- hooks ---------------------------------------------------------------------------------
    def attach(self, layer: nn.Module) -> None:
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
        if bool(((units == 0) | (units == 1)).all()):
            # 0/1 gates (ARM, or hard concrete saturated by the clamp, where d z / d log_alpha = 0):
            # an ordinary mask -- copy it into the buffers, the layer takes its fast paths
            with torch.no_grad():
                for group, value in self.group_masks(units.detach()).items():
                    layer._buffers[self.mask_attrs[group]].copy_(value)
            return
        # fractional gates: the layer must mix both copies, i.e. take its general path, which it
        # does for a mask that requires grad (without autograd recording: a leaf that does)
        masks = self.group_masks(units)
        for group, value in masks.items():
            attr = self.mask_attrs[group]
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
                f"units={self.num_units}, entries={self.num_entries}")


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

    Use: add ``gates.penalty()`` to the loss, put :meth:`parameters` of the
    gates in the optimizer (:meth:`add_to_optimizer`), call :meth:`step` with the
    training progress, and with ARM call :meth:`arm_update_` after
    ``loss.backward()``; finally :meth:`harden_`.
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
    ) -> None:
        super().__init__()
        est = get_estimator(estimator)
        target_ratio = _check_ratio(target_ratio)
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        sharpness = _check_sharpness(est.default_sharpness if sharpness is None else sharpness, "sharpness")
        if sharpness_end is None:
            sharpness_end = 100.0 * sharpness if schedule == "npn" else sharpness
        sharpness_end = _check_sharpness(sharpness_end, "sharpness_end")
        if schedule == "geometric" and (sharpness <= 0 or sharpness_end <= 0):
            raise ValueError("schedule='geometric' needs sharpness and sharpness_end > 0")
        p_drop = (0.05 if init == "open" else 0.95) if init_drop is None else init_drop
        if not (isinstance(p_drop, (int, float)) and 0.0 < p_drop < 1.0):
            raise ValueError(f"init_drop must be in (0, 1), got {p_drop!r}")
        a, b = (float(x) for x in npn_stages)
        if not 0.0 <= a <= b <= 1.0:
            raise ValueError(f"npn_stages must satisfy 0 <= a <= b <= 1, got {npn_stages!r}")
        if not (math.isfinite(init_noise) and init_noise >= 0):
            raise ValueError(f"init_noise must be a finite number >= 0, got {init_noise!r}")
        for name, module in model.named_modules():
            if is_compact_layer(module):
                raise ValueError(f"ModeGates: layer {name!r} is in compact (deploy) form; gates need the "
                                 "training form (attach them before compact_)")
            if isinstance(getattr(module, "mode_gate", None), LayerGate):
                raise ValueError(f"ModeGates: layer {name!r} already has gates attached")
        layers = [(n, m) for n, m in model.named_modules() if is_pad_layer(m)]
        if not layers:
            raise ValueError("ModeGates: the model has no PAD layers (run padnet.dynamize_ first)")

        self.target_ratio = target_ratio
        self.granularity = granularity
        self.estimator_name = estimator
        self.scope = scope
        self.init = init
        self.init_drop = float(p_drop)
        self.schedule = schedule
        self.sharpness_start = sharpness
        self.sharpness_end = sharpness_end
        self.npn_stages = (a, b)
        self.init_noise = float(init_noise)
        self.seed = int(seed)
        # NPN: phi is initialised relative to the stochastic-phase sharpness
        k_init = sharpness
        k0 = self.sharpness_at(0.0)
        gen = torch.Generator().manual_seed(self.seed)
        gates: list[tuple[str, nn.Module, LayerGate]] = []
        for name, layer in layers:
            plan_units = LayerPlan(name, layer, granularity).num_units
            init_t = torch.full((plan_units,), est.init_value(self.init_drop, k_init))
            if self.init_noise > 0:
                init_t += self.init_noise * torch.randn(plan_units, generator=gen) / (
                    k_init if estimator == "arm" else 1.0)
            gates.append((name, layer, LayerGate(name, layer, granularity, estimator, init_t, k0)))
        for name, layer, gate in gates:  # all built: now change the model
            layer.add_module("mode_gate", gate)
            gate.attach(layer)
        self.__dict__["_layers"] = gates
        self.__dict__["_model"] = model
        ref = gates[0][2].param
        n_budgets = 1 if scope == "global" else len(gates)
        self.multipliers = nn.Parameter(torch.zeros(n_budgets, 2, device=ref.device, dtype=torch.float32))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64, device=ref.device))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool, device=ref.device))
        cost = torch.tensor([float(g.num_factors - 1) for _, _, g in gates], dtype=torch.float32)
        if float(cost.sum()) == 0:
            cost = torch.ones_like(cost)  # K = 1 everywhere: charge entries equally
        self.register_buffer("layer_cost", cost.to(ref.device), persistent=False)

    # ---- access -------------------------------------------------------------------------------
    def layer_gates(self) -> Iterator[tuple[str, LayerGate]]:
        self._check_not_hardened()
        for name, _, gate in self.__dict__["_layers"]:
            yield name, gate

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-unit gate parameters (they live in the model, under ``<layer>.mode_gate``)."""
        return [g.param for _, g in self.layer_gates()]

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``ModeGates(model, **gates.config())`` rebuilds."""
        return {
            "target_ratio": self.target_ratio, "granularity": self.granularity, "estimator": self.estimator_name,
            "scope": self.scope, "init": self.init, "init_drop": self.init_drop, "sharpness": self.sharpness_start,
            "sharpness_end": self.sharpness_end, "schedule": self.schedule, "npn_stages": list(self.npn_stages),
            "init_noise": self.init_noise, "seed": self.seed,
        }

    def add_to_optimizer(self, optimizer: torch.optim.Optimizer, lr: float | None = None) -> dict[str, Any]:
        """Move the gate parameters and multipliers into one new param group (no weight decay).

        They are removed from any group that already holds them (e.g. one
        built from ``model.parameters()``). Returns the new group.
        """
        self._check_not_hardened()
        mine = self.gate_parameters() + [self.multipliers]
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
                                 {"params": [self.multipliers], "lr": float(mlr)}], betas=betas)

    def remove_from_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gate parameters and multipliers (and their state) from ``optimizer``'s groups."""
        _forget_params(optimizer, self.gate_parameters() + [self.multipliers])

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
        """
        exp, n, cost = self._expected()
        if self.scope == "global":
            gap = ((cost * exp).sum() / (cost * n).sum() - self.target_ratio).reshape(1)
        else:
            gap = exp / n - self.target_ratio
        lam = _ReverseGrad.apply(self.multipliers)
        return (lam[:, 0] * gap + lam[:, 1] * gap * gap).sum()

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
        }

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming every layer whose gate parameters are not finite."""
        bad = [name for name, g in self.layer_gates() if not bool(torch.isfinite(g.param).all())]
        if bad:
            raise FloatingPointError(f"ModeGates: non-finite gate parameters in layer(s) {bad} "
                                     "(lower the gate learning rate)")
        if not bool(torch.isfinite(self.multipliers).all()):
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
            grad = g.k() * (f_anti - f) * (g._arm_u - 0.5)
            if dist:
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()
            p = g.param
            p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad.to(p.dtype)
            g._arm_u = None

    # ---- hardening -------------------------------------------------------------------------
    @torch.no_grad()
    def hard_masks(self) -> dict[tuple[str, str], Tensor]:
        """The 0/1 masks hardening would write: top-k units by gate probability, exactly the target.

        Global scope: ``round(t * N)`` entries over all layers (exact for element
        units, to one unit's size for structured ones); layer scope: per layer.
        """
        gates = [(name, g) for name, g in self.layer_gates()]
        probs = [g.prob_open().float() + 1e-6 * g.deterministic_units().float() for _, g in gates]
        sizes = [g.unit_sizes for _, g in gates]
        structured = self.granularity != "element"
        keeps: list[Tensor] = []
        if self.scope == "global":
            total = sum(g.num_entries for _, g in gates)
            target = round_half_up(self.target_ratio * total)
            flat = torch.cat(probs)
            keep = select_top(flat, torch.cat(sizes) if structured else None, target)
            offset = 0
            for p in probs:
                keeps.append(keep[offset: offset + p.numel()])
                offset += p.numel()
        else:
            for (_, g), p, s in zip(gates, probs, sizes):
                keeps.append(select_top(p, s if structured else None, round_half_up(self.target_ratio * g.num_entries)))
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
        # ---- validate everything first (nothing is half-applied)
        plans = []
        for name, layer, gate in layers:
            z = {k: v.detach() for k, v in gate.group_masks(gate.deterministic_units()).items()}
            lambda_s, lambda_d = (float(s) for s in layer.scales())
            if not (math.isfinite(lambda_s) and math.isfinite(lambda_d) and lambda_s != 0 and lambda_d != 0):
                raise ValueError(f"layer {name!r}: lambda_s={lambda_s}, lambda_d={lambda_d}; hardening folds the "
                                 "gates into the weights and divides by both (reset layer.scale.phi)")
            if name in routing_means:
                mix, total = _check_mix(name, layer, routing_means[name])
            else:
                mix, total = layer.mode_transition_weights()  # raises naming the layer on bad statistics
            plans.append((name, layer, gate, z, lambda_s / lambda_d, float(total)))
        # ---- (1) gates -> 0/1 masks with the same function
        blended = 0
        for name, layer, gate, z, ratio_sd, total in plans:
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
                g.mask.copy_((zg > 0).to(g.mask.dtype))
            del layer._modules["mode_gate"]
        if optimizer is not None:
            _forget_params(optimizer, [gate.param for _, _, gate in layers] + [self.multipliers])
        self.hardened.fill_(True)
        # ---- (2) 0/1 masks -> the target masks, function-preserving
        spec: dict[str, dict[str, Tensor]] = {}
        for (name, group), m in masks.items():
            spec.setdefault(name, {})[group] = m
        routing = {n: torch.as_tensor(v, dtype=torch.float64) for n, v in routing_means.items()}
        transition = set_modes_(self.__dict__["_model"], spec, preserve=True, optimizer=optimizer,
                                routing=routing or None)
        report: dict[str, Any] = {"target_ratio": self.target_ratio, "fractional_gates_folded": blended,
                                  "transitions": transition.to_dict(), "layers": {}}
        dyn_total = entries_total = 0
        for name, layer, _, _, _, _ in plans:
            n_dyn = sum(int(masks[(name, g.name)].sum()) for g in layer.mode_groups())
            n_all = sum(g.mask.numel() for g in layer.mode_groups())
            dyn_total += n_dyn
            entries_total += n_all
            report["layers"][name] = n_dyn / max(n_all, 1)
        report["ratio"] = dyn_total / max(entries_total, 1)
        return report

    def remove_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take the gates off without touching weights or mask buffers (e.g. before loading a model
        checkpointed after hardening). The parameters leave ``optimizer``; the gates count as done."""
        self._check_not_hardened()
        layers = self.__dict__["_layers"]
        for _, layer, gate in layers:
            gate.detach_hooks()
            del layer._modules["mode_gate"]
        if optimizer is not None:
            _forget_params(optimizer, [gate.param for _, _, gate in layers] + [self.multipliers])
        self.hardened.fill_(True)

    def _check_not_hardened(self) -> None:
        if bool(self.hardened):
            raise RuntimeError("ModeGates: the gates were already hardened (harden_ can run once; "
                               "the masks are fixed now)")

    def extra_repr(self) -> str:
        return (f"target_ratio={self.target_ratio}, estimator={self.estimator_name!r}, "
                f"granularity={self.granularity!r}, scope={self.scope!r}, layers={len(self.__dict__['_layers'])}")


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
