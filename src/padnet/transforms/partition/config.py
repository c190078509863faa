"""``PartitionConfig``: the one definition of the mode-partition options.

:func:`~padnet.transforms.partition.partition_`, the trainer
(:class:`padnet.train.config.TrainConfig` ``partition_*`` settings) and
``padnet partition`` all build one of these, so the defaults and the checks
live here only:

=================  ===============  =====================================================
field              default          meaning
=================  ===============  =====================================================
``ratio``          0.3              target dynamic ratio kappa in (0, 1]
``criterion``      ``"taylor"``     registered name, :class:`Criterion` or callable
``iterations``     5                scoring rounds T >= 1
``schedule``       ``"exponential"`` kept ratio per iteration (name or callable)
``scope``          ``"global"``     one threshold over all layers, or ``"layer"``
``granularity``    ``"element"``    decision unit: ``element`` / ``kernel`` / ``channel``
``num_batches``    ``None``         batches used per iteration (``None``: all given)
``warmup_steps``   0                trainer only: optimizer steps before partitioning
``train_mode``     ``False``        score in train mode (BatchNorm batch statistics)
``seed``           0                seed of the generator handed to criteria
``criterion_kwargs`` ``{}``         extra keyword arguments of the criterion (JSON values)
``monotone``       ``None``         override the criterion's ranking rule
``preserve``       ``True``         function-preserving mode transitions (``False``: masks only)
``density``        ``None``         fraction of entries kept live (not pruned); ``None``: prune nothing
``density_distribution`` ``"uniform"`` per-group density: ``uniform`` or ``erk``
``prune_criterion`` ``"magnitude"`` which entries stay live: ``magnitude`` or seeded ``random``
=================  ===============  =====================================================

The trainer keeps its own defaults for two options that only make sense there
(``partition_batches = 4``: its loader is unbounded; ``partition_train_mode =
True``); every other default is read from this class.

Run-time switches that do not change the result (``progress``,
``warn_symmetric``, ``process_group``) are arguments of ``partition_``, not
options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import check_ratio
from ..sparsity import DISTRIBUTIONS, check_density
from .criteria import Criterion, get_criterion
from .schedules import get_schedule
from .units import GRANULARITIES

__all__ = ["DEFAULT_RATIO", "SCOPES", "PartitionConfig", "check_ratio"]

DEFAULT_RATIO = 0.3
SCOPES = ("global", "layer")
PRUNE_CRITERIA = ("magnitude", "random")



def _check_int(what: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int" + (f" >= {minimum}" if minimum is not None else "") + f", got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


@dataclass
class PartitionConfig:
    """Options of one mode partition (see the module docstring for each field).

    Validated on construction (and again by :meth:`validate`); bad values raise
    ``TypeError`` / ``ValueError`` naming the option. :meth:`from_options`
    builds one from a mapping and names the options as the caller spells them
    (``--ratio``, ``partition_iterations``).
    """

    ratio: float = DEFAULT_RATIO
    criterion: str | Criterion | Callable = "taylor"
    iterations: int = 5
    schedule: str | Callable = "exponential"
    scope: str = "global"
    granularity: str = "element"
    num_batches: int | None = None
    warmup_steps: int = 0
    train_mode: bool = False
    seed: int = 0
    criterion_kwargs: dict[str, Any] = field(default_factory=dict)
    monotone: bool | None = None
    preserve: bool = True
    density: float | None = None
    density_distribution: str = "uniform"
    prune_criterion: str = "magnitude"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, labels: Mapping[str, str] | None = None) -> "PartitionConfig":
        """Check every option; ``labels`` maps a field to the name used in messages.

        Normalises ``ratio`` to ``float`` and ``criterion_kwargs=None`` to ``{}``.
        Criterion and schedule names must be registered (the registries'
        errors list the registered names).
        """
        labels = dict(labels or {})

        def name(f: str) -> str:
            return labels.get(f, f)

        self.ratio = check_ratio(self.ratio, name("ratio"))
        get_criterion(self.criterion)
        get_schedule(self.schedule)
        _check_int(name("iterations"), self.iterations, 1)
        if self.scope not in SCOPES:
            raise ValueError(f"unknown {name('scope')} {self.scope!r}; expected one of {SCOPES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown {name('granularity')} {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.num_batches is not None:
            _check_int(name("num_batches"), self.num_batches, 1)
        _check_int(name("warmup_steps"), self.warmup_steps, 0)
        if not isinstance(self.train_mode, bool):
            raise TypeError(f"{name('train_mode')} must be a bool, got {self.train_mode!r}")
        _check_int(name("seed"), self.seed, None)
        if self.criterion_kwargs is None:
            self.criterion_kwargs = {}
        if not isinstance(self.criterion_kwargs, Mapping) or not all(isinstance(k, str) for k in self.criterion_kwargs):
            raise TypeError(f"{name('criterion_kwargs')} must be a mapping of keyword arguments, "
                            f"got {self.criterion_kwargs!r}")
        self.criterion_kwargs = dict(self.criterion_kwargs)
        try:  # recorded in the transform record: plain JSON only
            json.dumps(self.criterion_kwargs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name('criterion_kwargs')} must hold JSON values (numbers, strings, lists), "
                            f"got {self.criterion_kwargs!r}: {exc}") from None
        if self.monotone is not None and not isinstance(self.monotone, bool):
            raise TypeError(f"{name('monotone')} must be None or a bool, got {self.monotone!r}")
        if not isinstance(self.preserve, bool):
            raise TypeError(f"{name('preserve')} must be a bool, got {self.preserve!r}")
        if self.density is not None:
            self.density = check_density(self.density, name("density"))
            if self.ratio > self.density:
                raise ValueError(f"{name('ratio')}={self.ratio} exceeds {name('density')}={self.density}: dynamic "
                                 "entries must be live (not pruned)")
            if self.density < 1.0 and self.granularity != "element":
                raise ValueError(f"{name('density')} < 1 needs {name('granularity')}='element' "
                                 f"(got {self.granularity!r})")
        if self.density_distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown {name('density_distribution')} {self.density_distribution!r}; expected one "
                             f"of {DISTRIBUTIONS}")
        if self.prune_criterion not in PRUNE_CRITERIA:
            raise ValueError(f"unknown {name('prune_criterion')} {self.prune_criterion!r}; expected one of "
                             f"{PRUNE_CRITERIA}")
        return self

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> "PartitionConfig":
        """Build from a mapping of field values (missing ones take the defaults).

        Unknown keys raise ``ValueError`` listing the fields. ``labels`` maps a
        field to the name the caller's users know it by (a CLI flag, a config
        key), so that errors name that.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown partition options {unknown}; known: {known}")
        cfg = cls.__new__(cls)
        defaults = cls()
        for f in known:
            setattr(cfg, f, options[f] if f in options else getattr(defaults, f))
        return cfg.validate(labels)

    def replace(self, **changes: Any) -> "PartitionConfig":
        """A validated copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a criterion or schedule given as an object is stored by its name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["criterion"] = self.criterion if isinstance(self.criterion, str) else get_criterion(self.criterion).name
        d["schedule"] = self.schedule_name
        d["criterion_kwargs"] = dict(self.criterion_kwargs)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PartitionConfig":
        """Inverse of :meth:`to_dict` for registered criteria and schedules."""
        return cls.from_options(data)

    @property
    def schedule_name(self) -> str:
        """The schedule's registered name, or the callable's ``__name__``."""
        if isinstance(self.schedule, str):
            return self.schedule
        return getattr(self.schedule, "__name__", "custom")

