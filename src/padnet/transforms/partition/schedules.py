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

from ...registry import Registry

__all__ = ["SCHEDULES", "get_schedule", "list_schedules", "register_schedule", "unregister_schedule"]

ScheduleFn = Callable[[int, int, float, float], float]


def _check_callable(name: str, fn: ScheduleFn) -> None:
    if not callable(fn):
        raise TypeError(f"schedule {name!r} must be callable, got {type(fn).__name__}")


SCHEDULES: Registry[ScheduleFn] = Registry("schedule", check=_check_callable)


def register_schedule(name: str, fn: ScheduleFn | None = None, *, overwrite: bool = False):
    """Register ``fn(t, T, kappa, start) -> ratio`` under ``name`` (function or decorator); returns ``fn``."""
    return SCHEDULES.register(name, fn, overwrite=overwrite)


def unregister_schedule(name: str) -> None:
    """Remove a registered schedule (``KeyError`` listing the registered ones if absent)."""
    SCHEDULES.unregister(name)


def list_schedules() -> list[str]:
    """Sorted names of all registered schedules."""
    return SCHEDULES.names()


def get_schedule(schedule: str | ScheduleFn) -> ScheduleFn:
    """Resolve a name or callable; unknown names raise ``ValueError`` (and ``KeyError``) listing the registered ones."""
    if isinstance(schedule, str):
        return SCHEDULES.get(schedule)
    if callable(schedule):
        return schedule
    raise ValueError(f"unknown schedule {schedule!r}; registered schedules: {', '.join(list_schedules())}")


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
