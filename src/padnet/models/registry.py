"""Model registry: build zoo models by name and remember how they were built."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from torch import nn

from .mobilenetv2 import mobilenet_v2
from .resnet import resnet10, resnet18, resnet34, resnet50
from .spec import record_spec

__all__ = ["MODEL_REGISTRY", "create_model", "list_models", "register_model"]

ModelFn = Callable[..., nn.Module]

MODEL_REGISTRY: Dict[str, ModelFn] = {
    "resnet10": resnet10,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}


def register_model(
    name: str, fn: Optional[ModelFn] = None, *, overwrite: bool = False
) -> Any:
    """Add ``fn`` to :data:`MODEL_REGISTRY` under ``name``; usable as a decorator
    (``@register_model("bert_tiny")``). Returns ``fn``."""

    def _add(f: ModelFn) -> ModelFn:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not f and not overwrite:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = f
        return f

    return _add if fn is None else _add(fn)


def list_models() -> List[str]:
    """Sorted names of all registered models."""
    return sorted(MODEL_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    The result records ``{"name": name, "kwargs": kwargs}`` as
    ``model.padnet_state.model_spec`` (unless the factory recorded a richer
    spec itself) so the same architecture can be rebuilt later (``padnet.load``).
    Raises ``ValueError`` for an unknown name.
    """
    try:
        fn = MODEL_REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    model = fn(**kwargs)
    return record_spec(model, name, dict(kwargs))
