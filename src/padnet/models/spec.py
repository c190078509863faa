"""How a zoo model records the way it was built, so :func:`padnet.load` can rebuild it.

Every zoo factory is wrapped by :func:`records_spec`: the model it returns
carries ``{"name": <registered name>, "kwargs": <the arguments given>}`` as
``model.padnet_state.model_spec`` (see :mod:`padnet.transforms.record`), whether
it was built with ``create_model(name, **kw)`` or by calling the factory
directly (``resnet18(num_classes=10)``). Arguments that are not JSON leave the
spec unset (then ``padnet.load`` needs ``model=``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from ..transforms.record import find_state, set_model_spec

__all__ = ["records_spec", "record_spec", "width_argument"]


def record_spec(model: nn.Module, name: str, kwargs: dict[str, Any], *, overwrite: bool = False) -> nn.Module:
    """Store ``{"name": name, "kwargs": kwargs}`` on ``model`` unless it has one (or ``overwrite``)."""
    state = find_state(model)
    if state is not None and state.model_spec is not None and not overwrite:
        return model
    try:
        set_model_spec(model, name, kwargs)
    except (TypeError, ValueError):
        pass  # not JSON: no spec; padnet.load then asks for the base model
    return model


def records_spec(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: the factory's result records ``name`` and the arguments it was called with."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def factory(*args: Any, **kwargs: Any) -> nn.Module:
            model = fn(*args, **kwargs)
            return record_spec(model, name, dict(signature.bind(*args, **kwargs).arguments))

        return factory

    return wrap


def width_argument(name: str) -> str:
    """The keyword a registered model takes for its channel width (``"width"`` or ``"width_mult"``).

    Read from the factory's signature, not from its name.
    """
    from .registry import MODEL_REGISTRY

    try:
        fn = MODEL_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}") from None
    params = inspect.signature(fn).parameters
    for key in ("width", "width_mult"):
        if key in params:
            return key
    raise ValueError(f"model {name!r} takes no width argument (neither 'width' nor 'width_mult')")
