"""``PadConfig``: which layers :func:`padnet.dynamize_` converts, and how.

A :class:`PadConfig` holds the *targets* (which modules) and one options block
per layer type: :class:`DynamicConvConfig` for ``nn.Conv2d`` -> ``DynamicConv2d``
and :class:`MoEConfig` for feed-forward blocks -> ``MoEFeedForward``. The
dynamic ratio kappa is not here: it belongs to the partition
(``PartitionConfig.ratio``, :func:`padnet.partition_`).

Versioned JSON round trip (``to_dict`` / ``from_dict`` / ``to_json`` /
``from_json``). Version 2 nests the options; version-1 dicts (flat keys, as
written by padnet 0.1) migrate on ``from_dict``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..layers.dynamic_conv import BACKENDS, ROUTER_NORMS, ROUTINGS
from ..layers.modes import SCALE_MODES
from ..layers.moe import BALANCE_LOSSES
from ..layers.moe import ROUTINGS as MOE_ROUTINGS

CONFIG_VERSION = 2
TARGET_TYPES = ("conv2d", "ffn")
INITS = ("inherit", "fresh")
ROUTER_INITS = ("official", "torch")
MOE_INITS = ("upcycle", "split")

# v1 (flat) key -> (block, v2 key); "noise_std" and "scale" applied to both blocks
_V1_CONV_KEYS = ("num_kernels", "reduction", "temperature", "routing", "scale", "init", "noise_std", "backend")
_V1_MOE_KEYS = {"num_experts": "num_experts", "top_k": "top_k", "moe_init": "init", "noise_std": "noise_std",
                "scale": "scale", "aux_loss_coef": "aux_loss_coef"}
# flat shortcuts a training config's ``pad_config`` may use for dynamic-conv options (v1 names + newer ones)
_FLAT_CONV_KEYS = (*_V1_CONV_KEYS, "router_init", "router_norm")
_V1_DROPPED = ("dynamic_ratio",)  # was never read by dynamize_; kappa is the partition's


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """Validate a dynamic ratio kappa in (0, 1]; returns it as a float.

    ``TypeError`` for a non-number (``bool`` included), ``ValueError`` outside
    (0, 1] (NaN included).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{what} must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:  # NaN fails this comparison too
        raise ValueError(f"{what} must be in (0, 1], got {ratio}")
    return float(ratio)


def _int(value: Any, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


def _float(value: Any, what: str, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")


def _from_fields(cls, data: Any, what: str):
    if not isinstance(data, dict):
        raise TypeError(f"{what} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys: {sorted(known)}")
    return cls(**data)


@dataclass
class DynamicConvConfig:
    """Options of ``nn.Conv2d`` -> :class:`~padnet.layers.DynamicConv2d`.

    Attributes:
        num_kernels: K, dynamic kernels per conv (>= 1).
        reduction: channel reduction of the routing MLP (>= 1).
        temperature: softmax / sigmoid temperature of the router (> 0).
        routing: ``"softmax"`` or ``"sigmoid"``.
        scale: ``"learned"`` (lambda_s, lambda_d) or ``"none"``.
        init: ``"inherit"`` (keep a trained conv's function: kernels seeded from it) or ``"fresh"``
            (independent He fan-out kernels, as the official PAD-Net code).
        router_init: ``"official"`` (PAD-Net code: He-normal hidden layer, N(0, 2/K) last layer,
            zero bias) or ``"torch"`` (``nn.Linear`` default).
        router_norm: ``"none"`` (official router) or ``"batch"`` (BatchNorm on the router's hidden
            units, so that the routing of early layers, whose pooled inputs barely differ between
            samples, depends on the input; docs/training.md).
        noise_std: relative noise on inherited kernels (>= 0; breaks symmetry).
        backend: compute backend (``"auto"`` picks per call).
    """

    num_kernels: int = 4
    reduction: int = 4
    temperature: float = 1.0
    routing: str = "softmax"
    scale: str = "learned"
    init: str = "inherit"
    router_init: str = "official"
    router_norm: str = "none"
    noise_std: float = 0.01
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first invalid field."""
        _int(self.num_kernels, "num_kernels (K)", 1)
        _int(self.reduction, "reduction", 1)
        _float(self.temperature, "temperature", positive=True)
        _choice(self.routing, "routing", ROUTINGS)
        _choice(self.scale, "scale", SCALE_MODES)
        _choice(self.init, "init", INITS)
        _choice(self.router_init, "router_init", ROUTER_INITS)
        _choice(self.router_norm, "router_norm", ROUTER_NORMS)
        _float(self.noise_std, "noise_std", positive=False)
        _choice(self.backend, "backend", BACKENDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DynamicConvConfig":
        return _from_fields(cls, data, "DynamicConvConfig")


@dataclass
class MoEConfig:
    """Options of a feed-forward block -> :class:`~padnet.layers.MoEFeedForward`.

    Attributes:
        num_experts: experts per FFN (>= 1).
        top_k: experts per token, in ``[1, num_experts]``.
        init: ``"upcycle"`` (every expert a copy of the FFN) or ``"split"``.
        noise_std: relative noise on upcycled experts (>= 0).
        scale: ``"learned"`` or ``"none"``.
        aux_loss_coef: weight of the balancing loss (>= 0).
        routing: ``"softmax"`` top-k, ``"noisy"`` top-k (learned noise scale,
            training only) or ``"sigmoid"`` scores renormalised over the top k.
        balance_loss: ``"switch"``, ``"cv2"`` (cv^2 of importance + load) or ``"none"``.
        z_loss_coef: weight of the router z-loss (>= 0; 0 = off).
        bias_balancing: auxiliary-loss-free balancing with a per-expert selection bias.
        bias_update_rate: its step gamma (>= 0), ``b_e += gamma * sign(mean load - load_e)``.
        normalize_gates: renormalise the chosen gates to sum to one.
        (docs/moe.md has the formulas.)
    """

    num_experts: int = 4
    top_k: int = 2
    init: str = "upcycle"
    noise_std: float = 0.01
    scale: str = "learned"
    aux_loss_coef: float = 0.01
    routing: str = "softmax"
    balance_loss: str = "switch"
    z_loss_coef: float = 0.0
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    normalize_gates: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first invalid field."""
        _int(self.num_experts, "num_experts", 1)
        _int(self.top_k, "top_k", 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _choice(self.init, "moe init", MOE_INITS)
        _float(self.noise_std, "noise_std", positive=False)
        _choice(self.scale, "scale", SCALE_MODES)
        _float(self.aux_loss_coef, "aux_loss_coef", positive=False)
        _choice(self.routing, "MoE routing", MOE_ROUTINGS)
        _choice(self.balance_loss, "balance_loss", BALANCE_LOSSES)
        _float(self.z_loss_coef, "z_loss_coef", positive=False)
        if not isinstance(self.bias_balancing, bool) or not isinstance(self.normalize_gates, bool):
            raise TypeError("bias_balancing and normalize_gates must be booleans")
        _float(self.bias_update_rate, "bias_update_rate (gamma)", positive=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        return _from_fields(cls, data, "MoEConfig")


def _check_patterns(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{what}: {value!r} is not a valid regular expression ({exc})") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be None, a regex string or a list of module names, got {value!r}")


@dataclass(init=False)
class PadConfig:
    """Configuration of :func:`padnet.dynamize_`.

    Targets: ``target_modules`` is a list of module names matched exactly or as
    a dotted suffix (``"conv1"`` matches ``"layer1.0.conv1"``), or one string
    used as a full-match regular expression (as in peft). ``target_types``
    selects by kind: ``"conv2d"`` and/or ``"ffn"`` (every feed-forward block a
    registered converter recognises: ``nn.Sequential(Linear, act, Linear)``,
    HF BERT-style blocks, ...). When both are ``None`` the default is every FFN
    block if the model has any, else every ``nn.Conv2d`` except the stem (the
    first conv) and a conv output head (see :mod:`padnet.transforms.dynamize`).
    ``exclude_modules`` uses the same matching as ``target_modules``.

    ``conv`` and ``moe`` hold the per-layer-type options; ``seed`` (if set)
    makes the conversion reproducible without touching the global RNG.

    Shorthand: option names may also be given flat, as in padnet 0.1
    (``PadConfig(num_kernels=4, top_k=1)``); each goes to its block
    (``num_kernels`` -> ``conv``, ``num_experts`` / ``top_k`` / ``moe_init`` /
    ``aux_loss_coef`` -> ``moe``; ``noise_std`` and ``scale`` -> both) on top of
    ``conv`` / ``moe`` if those are given too.
    """

    target_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    conv: DynamicConvConfig = field(default_factory=DynamicConvConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    seed: int | None = None
    version: int = field(default=CONFIG_VERSION)

    def __init__(
        self,
        target_modules: list[str] | str | None = None,
        target_types: list[str] | None = None,
        exclude_modules: list[str] | str | None = None,
        conv: DynamicConvConfig | None = None,
        moe: MoEConfig | None = None,
        seed: int | None = None,
        version: int = CONFIG_VERSION,
        **options: Any,
    ) -> None:
        self.target_modules = target_modules
        self.target_types = target_types
        self.exclude_modules = exclude_modules
        self.conv = DynamicConvConfig() if conv is None else conv
        self.moe = MoEConfig() if moe is None else moe
        self.seed = seed
        self.version = version
        if options:
            check_override_keys(options)
            nested = sorted(k for k in options if k not in _FLAT_CONV_KEYS and k not in _V1_MOE_KEYS)
            if nested:
                raise TypeError(f"PadConfig got unexpected keyword arguments {nested}")
            self._check_blocks()
            conv_opts = {sub: v for k, v in options.items() for b, sub in _v1_targets(k) if b == "conv"}
            moe_opts = {sub: v for k, v in options.items() for b, sub in _v1_targets(k) if b == "moe"}
            self.conv = replace(self.conv, **conv_opts)
            self.moe = replace(self.moe, **moe_opts)
        self.validate()

    def _check_blocks(self) -> None:
        if not isinstance(self.conv, DynamicConvConfig):
            raise TypeError(f"PadConfig.conv must be a DynamicConvConfig, got {type(self.conv).__name__}")
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"PadConfig.moe must be a MoEConfig, got {type(self.moe).__name__}")

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first invalid field."""
        _check_patterns(self.target_modules, "target_modules")
        _check_patterns(self.exclude_modules, "exclude_modules")
        if self.target_types is not None:
            if not isinstance(self.target_types, (list, tuple)):
                raise TypeError(f"target_types must be None or a list, got {self.target_types!r}")
            for t in self.target_types:
                _choice(t, "target type", TARGET_TYPES)
        self._check_blocks()
        self.conv.validate()
        self.moe.validate()
        if self.seed is not None:
            _int(self.seed, "seed", 0)
        if self.version != CONFIG_VERSION:
            raise ValueError(f"PadConfig version {self.version} is not supported (this padnet writes "
                             f"{CONFIG_VERSION}; read older dicts with PadConfig.from_dict)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PadConfig":
        """Build from a v2 dict, or migrate a v1 (flat, padnet 0.1) dict; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"PadConfig must be built from a mapping, got {type(data).__name__}")
        version = data.get("version", CONFIG_VERSION if ("conv" in data or "moe" in data) else 1)
        if version == 1:
            data = migrate_v1(data)
        elif version != CONFIG_VERSION:
            raise ValueError(f"PadConfig version {version!r} is not supported (this padnet reads 1 and "
                             f"{CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PadConfig keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        data["conv"] = DynamicConvConfig.from_dict(data.get("conv", {}))
        data["moe"] = MoEConfig.from_dict(data.get("moe", {}))
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PadConfig":
        """Parse a JSON string, or read a JSON file when given an existing path."""
        source = str(text_or_path)
        if not source.lstrip().startswith("{"):
            path = Path(source)
            try:
                source = path.read_text()
            except OSError as exc:
                raise FileNotFoundError(f"cannot read PadConfig file {path}: {exc}") from exc
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PadConfig JSON is malformed: {exc}") from exc
        return cls.from_dict(data)

    def updated(self, overrides: dict[str, Any]) -> "PadConfig":
        """A copy with ``overrides`` applied: v2 keys (``{"conv": {"scale": "none"}}`` or
        ``"conv.scale"``), or flat v1 option names (``"top_k"``, ``"scale"``), as a
        training config's ``pad_config`` mapping gives them."""
        check_override_keys(overrides or {})
        data = self.to_dict()
        for key, value in (overrides or {}).items():
            if key in ("conv", "moe") and isinstance(value, dict):
                data[key].update(value)
            elif "." in key and key.split(".", 1)[0] in ("conv", "moe"):
                block, sub = key.split(".", 1)
                data[block][sub] = value
            elif key in _FLAT_CONV_KEYS or key in _V1_MOE_KEYS:
                for block, sub in _v1_targets(key):
                    data[block][sub] = value
            else:
                data[key] = value
        return PadConfig.from_dict(data)


def override_keys() -> list[str]:
    """Keys :meth:`PadConfig.updated` accepts: top-level fields, ``conv.*`` / ``moe.*`` and flat v1 option names."""
    top = [f.name for f in fields(PadConfig) if f.name not in ("conv", "moe", "version")]
    nested = [f"conv.{f.name}" for f in fields(DynamicConvConfig)] + [f"moe.{f.name}" for f in fields(MoEConfig)]
    return sorted({*top, "conv", "moe", *nested, *_FLAT_CONV_KEYS, *_V1_MOE_KEYS})


def check_override_keys(overrides: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming keys of ``overrides`` that :meth:`PadConfig.updated` would not accept."""
    if not isinstance(overrides, dict):
        raise TypeError(f"pad_config overrides must be a mapping, got {type(overrides).__name__}")
    dropped = sorted(set(overrides) & set(_V1_DROPPED))
    if dropped:
        raise ValueError(f"{dropped} is not a PadConfig option (the dynamic ratio kappa is the partition's "
                         f"ratio, e.g. --ratio)")
    known = set(override_keys())
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown pad_config keys {bad}; known: {sorted(known)}")


def _v1_targets(key: str) -> list[tuple[str, str]]:
    out = []
    if key in _FLAT_CONV_KEYS:
        out.append(("conv", key))
    if key in _V1_MOE_KEYS:
        out.append(("moe", _V1_MOE_KEYS[key]))
    return out


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 (flat) PadConfig dict as a version-2 dict.

    ``noise_std`` and ``scale`` applied to both blocks (v1 shared them);
    ``init`` -> ``conv.init``, ``moe_init`` -> ``moe.init``; ``dynamic_ratio`` is
    dropped (padnet 0.1 never read it when converting). Unknown keys raise.
    """
    top = {"target_modules", "target_types", "exclude_modules", "seed", "version"}
    known = top | set(_V1_CONV_KEYS) | set(_V1_MOE_KEYS) | set(_V1_DROPPED)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown PadConfig (version 1) keys {unknown}; known keys: {sorted(known)}")
    if "dynamic_ratio" in data:  # dropped, but a value padnet 0.1 could not have written is a damaged file
        check_ratio(data["dynamic_ratio"], "dynamic_ratio (padnet 0.1 PadConfig)")
    out: dict[str, Any] = {k: data[k] for k in top if k in data}
    out["version"] = CONFIG_VERSION
    out["conv"], out["moe"] = {}, {}
    for key, value in data.items():
        for block, sub in _v1_targets(key):
            out[block][sub] = value
    return out
