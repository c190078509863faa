"""Kept-ratio schedules of Iterative Mode Partition.

A schedule is ``fn(t, T, kappa, start=1.0) -> kept ratio`` for iteration
``t = 1..T``; it must reach ``kappa`` at ``t = T``. ``start`` is the dynamic
ratio before the call (1.0 for a freshly dynamized model), for which the
built-ins are exactly:

- ``exponential`` (default): ``kappa ** (t / T)``; in general
  ``start * (kappa / start) ** (t / T)``.
- ``linear``: ``1 - (1 - kappa) * t / T``; in general
  ``start + (kappa - start) * t / T``.
- ``cosine``: ``kappa + (1 - kappa) * (1 + cos(pi * t / T)) / 2``; in general
  with ``start`` in place of 1.

The partitioner always uses exactly ``kappa`` at ``t = T`` (so a schedule's
float rounding cannot change the final count).
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["get_schedule", "list_schedules", "register_schedule", "unregister_schedule"]

ScheduleFn = Callable[[int, int, float, float], float]

_REGISTRY: dict[str, ScheduleFn] = {}


def register_schedule(name: str, fn: ScheduleFn | None = None, *, overwrite: bool = False):
    """Register ``fn(t, T, kappa, start) -> ratio`` under ``name`` (function or decorator); returns ``fn``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"schedule name must be a non-empty string, got {name!r}")

    def _add(f: ScheduleFn) -> ScheduleFn:
        if not callable(f):
            raise TypeError(f"schedule {name!r} must be callable, got {type(f).__name__}")
        if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
            raise ValueError(f"schedule {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = f
        return f

    return _add if fn is None else _add(fn)


def unregister_schedule(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(f"schedule {name!r} is not registered; registered: {list_schedules()}")
    del _REGISTRY[name]


def list_schedules() -> list[str]:
    """Sorted names of all registered schedules."""
    return sorted(_REGISTRY)


def get_schedule(schedule: str | ScheduleFn) -> ScheduleFn:
    """Resolve a name or callable; unknown names raise ``ValueError`` listing the registered ones."""
    if isinstance(schedule, str):
        if schedule not in _REGISTRY:
            raise ValueError(f"unknown schedule {schedule!r}; registered schedules: {list_schedules()}")
        return _REGISTRY[schedule]
    if callable(schedule):
        return schedule
    raise ValueError(f"unknown schedule {schedule!r}; registered schedules: {list_schedules()}")


@register_schedule("exponential")
def exponential(t: int, T: int, kappa: float, start: float = 1.0) -> float:
    """``start * (kappa / start) ** (t / T)`` (``kappa ** (t / T)`` from a fully dynamic model)."""
    if start <= 0.0:
        return kappa
    return start * (kappa / start) ** (t / T)


@register_schedule("linear")
def linear(t: int, T: int, kappa: float, start: float = 1.0) -> float:
    """``start + (kappa - start) * t / T`` (``1 - (1 - kappa) t / T`` from a fully dynamic model)."""
    return start + (kappa - start) * t / T


@register_schedule("cosine")
def cosine(t: int, T: int, kappa: float, start: float = 1.0) -> float:
    """``kappa + (start - kappa) * (1 + cos(pi t / T)) / 2``."""
    return kappa + (start - kappa) * (1.0 + math.cos(math.pi * t / T)) / 2.0
