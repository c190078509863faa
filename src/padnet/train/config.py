"""``TrainConfig``: every setting of one training run, fully resolved.

Precedence when resolving (:func:`resolve_config`), lowest first:

1. the dataclass defaults below,
2. the recipe's :attr:`~padnet.train.recipes.base.Recipe.defaults`,
3. a config file (``--config FILE``, YAML or JSON; keys are field names,
   dashes or underscores),
4. explicit command-line flags.

Recipe-specific settings live in ``options`` (a dict); a recipe declares them,
with their defaults, in :attr:`Recipe.options`. A config-file key that is not
a field but is one of the recipe's options goes to ``options`` too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

VARIANTS = ("static", "dynamic", "pad")
OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_PAD_RATIO = 0.3

# Fields that may differ between a run and its resumption (they do not change results).
RUNTIME_FIELDS = ("output_dir", "quiet", "num_workers", "device", "data_dir", "threads")


@dataclass
class TrainConfig:
    """All settings of a training run (see ``docs/training.md`` for each flag)."""

    recipe: str = "fashion-mnist"
    variant: str = "pad"
    ratio: float | None = None  # kappa, pad only; default 0.3 for pad
    # mode partition (pad variant)
    criterion: str = "taylor"
    partition_iterations: int = 5
    partition_schedule: str = "exponential"
    partition_scope: str = "global"
    partition_granularity: str = "element"
    partition_batches: int = 4
    partition_warmup_steps: int = 0  # 0: partition at init; N: after N optimizer steps (--partition-at-step N)
    partition_preserve: bool = True  # function-preserving mode transitions (padnet.transforms.transitions)
    partition_train_mode: bool = True  # score with BatchNorm batch statistics
    # learned mode gates (pad, partition="gates"; padnet.transforms.gates, docs/partition.md)
    partition: str = "imp"  # imp: Iterative Mode Partition | gates: learned gates, hardened at harden_at
    gate_estimator: str = "hard_concrete"  # hard_concrete | arm
    gate_init: str = "open"  # open (sparsify) | hibernate (expand)
    gate_sharpness: float | None = None  # hard concrete 1/beta (1.5), ARM k (7)
    gate_sharpness_end: float | None = None
    gate_schedule: str | None = None  # constant | linear | geometric | npn (default: npn for arm, else constant)
    gate_lr: float | None = None  # Adam learning rate of gates and multipliers (default 0.05)
    harden_at: float = 0.8  # fraction of the run's optimizer steps after which the gates are hardened
    # model
    model: str | None = None
    width: float | None = None
    num_kernels: int = 4
    pad_config: dict[str, Any] = field(default_factory=dict)  # extra PadConfig fields
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    aux_loss: bool = True  # add padnet.layers.moe.collect_aux_loss(model) (MoE load balancing)
    # dynamic-conv temperature: linear from start to end over the first temperature_epochs
    # epochs (never more than half of the run), then constant
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    temperature_epochs: float = 3.0
    # if set: anneal over this fraction of the run's optimizer steps instead of temperature_epochs
    # (the official PAD-Net code: 31 -> 1 over the first 10 of 100 epochs)
    temperature_anneal_fraction: float | None = None
    # data
    data_dir: str | None = None
    augment: bool = True
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    num_workers: int = 0
    # runtime
    seed: int = 0
    device: str = "auto"
    nproc: int = 1
    threads: int | None = None  # torch intra-op threads per process (default: torch's choice)
    find_unused_parameters: bool = False
    output_dir: str | None = None
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad setting; fills the pad default ratio."""
        from ..config import check_ratio

        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.variant == "pad":
            self.ratio = check_ratio(DEFAULT_PAD_RATIO if self.ratio is None else self.ratio, "--ratio")
        elif self.ratio is not None:
            raise ValueError(
                f"--ratio is only meaningful with --variant pad (got --variant {self.variant} --ratio {self.ratio}); "
                f"'dynamic' is fully dynamic (ratio 1) and 'static' has no dynamic part"
            )
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        if self.eval_batch_size is not None:
            _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("partition_iterations", self.partition_iterations)
        _positive_int("partition_batches", self.partition_batches)
        _positive_int("num_kernels", self.num_kernels)
        _positive_int("nproc", self.nproc)
        if self.threads is not None:
            _positive_int("threads", self.threads)
        _nonneg_int("partition_warmup_steps", self.partition_warmup_steps)
        _nonneg_int("warmup_steps", self.warmup_steps)
        _nonneg_int("num_workers", self.num_workers)
        _nonneg_int("seed", self.seed)
        for name in ("max_train_samples", "max_test_samples"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_float("lr", self.lr)
        _positive_float("temperature_start", self.temperature_start)
        _positive_float("temperature_end", self.temperature_end)
        _nonneg_float("temperature_epochs", self.temperature_epochs)
        if self.temperature_anneal_fraction is not None:
            _nonneg_float("temperature_anneal_fraction", self.temperature_anneal_fraction)
            if self.temperature_anneal_fraction > 1:
                raise ValueError(f"temperature_anneal_fraction must be in [0, 1], got {self.temperature_anneal_fraction}")
        if not isinstance(self.partition_preserve, bool):
            raise ValueError(f"partition_preserve must be true or false, got {self.partition_preserve!r}")
        _nonneg_float("weight_decay", self.weight_decay)
        _nonneg_float("momentum", self.momentum)
        _nonneg_float("min_lr", self.min_lr)
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None:
            _positive_float("grad_clip", self.grad_clip)
        if self.width is not None:
            _positive_float("width", self.width)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if not isinstance(self.pad_config, dict) or not isinstance(self.options, dict):
            raise ValueError("pad_config and options must be mappings")
        if self.variant == "pad":
            from ..partition import SCOPES, GRANULARITIES, list_criteria, list_schedules

            if self.criterion not in list_criteria():
                raise ValueError(f"unknown criterion {self.criterion!r}; known: {', '.join(list_criteria())}")
            if self.partition_schedule not in list_schedules():
                raise ValueError(
                    f"unknown partition_schedule {self.partition_schedule!r}; known: {', '.join(list_schedules())}"
                )
            if self.partition_scope not in SCOPES:
                raise ValueError(f"unknown partition_scope {self.partition_scope!r}; expected one of {SCOPES}")
            if self.partition_granularity not in GRANULARITIES:
                raise ValueError(
                    f"unknown partition_granularity {self.partition_granularity!r}; expected one of {GRANULARITIES}"
                )
        self._validate_gates()
        if self.pad_config:
            from ..config import PadConfig

            known = {f.name for f in fields(PadConfig)}
            bad = sorted(set(self.pad_config) - known)
            if bad:
                raise ValueError(f"unknown pad_config keys {bad}; known: {sorted(known)}")
        return self

    def _validate_gates(self) -> None:
        from ..transforms.gates import ESTIMATORS, INITS, SCHEDULES

        if self.partition not in ("imp", "gates"):
            raise ValueError(f"unknown partition {self.partition!r}; expected 'imp' or 'gates'")
        if self.partition != "gates":
            return
        if self.variant != "pad":
            raise ValueError(f"--partition gates needs --variant pad (got --variant {self.variant})")
        if self.gate_estimator not in ESTIMATORS:
            raise ValueError(f"unknown gate_estimator {self.gate_estimator!r}; expected one of {tuple(ESTIMATORS)}")
        if self.gate_init not in INITS:
            raise ValueError(f"unknown gate_init {self.gate_init!r}; expected one of {INITS}")
        if self.gate_schedule is not None and self.gate_schedule not in SCHEDULES:
            raise ValueError(f"unknown gate_schedule {self.gate_schedule!r}; expected one of {SCHEDULES}")
        for name in ("gate_sharpness", "gate_sharpness_end", "gate_lr"):
            if getattr(self, name) is not None:
                _positive_float(name, getattr(self, name))
        h = self.harden_at
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or not 0.0 < h <= 1.0:
            raise ValueError(f"harden_at must be a fraction of the run in (0, 1], got {h!r}")

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        data = {normalize_key(k): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        if "betas" in data and data["betas"] is not None:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def is_dynamic(self) -> bool:
        return self.variant in ("dynamic", "pad")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def normalize_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding one mapping of settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:  # pragma: no cover - pyyaml is a declared extra
                if suffix in (".yaml", ".yml"):
                    raise ValueError(f"{path}: reading YAML needs pyyaml (pip install pyyaml)") from None
                data = json.loads(text)
            else:
                data = yaml.safe_load(text)  # JSON is YAML too
    except (json.JSONDecodeError, ValueError) as exc:
        kind = "JSON" if suffix == ".json" else "YAML/JSON"
        raise ValueError(f"config file {path} is not valid {kind}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return {normalize_key(k): v for k, v in data.items()}


def resolve_config(flags: dict[str, Any], file_values: dict[str, Any] | None = None) -> TrainConfig:
    """Merge dataclass defaults < recipe defaults < ``file_values`` < ``flags``; validate.

    ``flags`` holds only settings given explicitly. Keys of either mapping that are
    neither fields nor options of the chosen recipe raise ``ValueError``.
    """
    from .recipes import get_recipe

    file_values = {normalize_key(k): v for k, v in (file_values or {}).items()}
    flags = {normalize_key(k): v for k, v in flags.items()}
    recipe_name = flags.get("recipe") or file_values.get("recipe") or TrainConfig.recipe
    recipe = get_recipe(recipe_name)
    known = set(field_names())
    merged: dict[str, Any] = {}
    options: dict[str, Any] = dict(recipe.options)
    pad_config: dict[str, Any] = {}
    for source_name, source in (("recipe defaults", recipe.defaults), ("config file", file_values), ("flags", flags)):
        for key, value in source.items():
            key = normalize_key(key)
            if key == "options":
                if not isinstance(value, dict):
                    raise ValueError(f"{source_name}: 'options' must be a mapping, got {type(value).__name__}")
                _check_options(recipe, value, source_name)
                options.update(value)
            elif key == "pad_config":
                if not isinstance(value, dict):
                    raise ValueError(f"{source_name}: 'pad_config' must be a mapping, got {type(value).__name__}")
                pad_config.update(value)
            elif key in known:
                merged[key] = value
            elif key in recipe.options:
                options[key] = value
            else:
                raise ValueError(
                    f"unknown setting {key!r} in {source_name}; training settings: {', '.join(sorted(known))}"
                    + (f"; options of recipe {recipe.name!r}: {', '.join(sorted(recipe.options))}"
                       if recipe.options else "")
                )
    # an explicit --temperature-epochs wins over a recipe's default anneal fraction (and vice versa)
    explicit = set(file_values) | set(flags)
    if "temperature_epochs" in explicit and "temperature_anneal_fraction" not in explicit:
        merged["temperature_anneal_fraction"] = None
    merged["recipe"] = recipe.name
    merged["options"] = options
    merged["pad_config"] = pad_config
    cfg = TrainConfig.from_dict(merged)
    cfg.validate()
    recipe.check_config(cfg)
    return cfg


def _check_options(recipe, values: dict[str, Any], source_name: str) -> None:
    bad = sorted(set(values) - set(recipe.options))
    if bad:
        raise ValueError(
            f"{source_name}: unknown options {bad} for recipe {recipe.name!r}; "
            f"known options: {', '.join(sorted(recipe.options)) or 'none'}"
        )


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _nonneg_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
