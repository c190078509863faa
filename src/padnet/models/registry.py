"""Model registry: build zoo models by name and remember how they were built."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import nn

from .mobilenetv2 import mobilenet_v2
from .resnet import resnet10, resnet18, resnet34, resnet50
from .spec import record_spec

from ..registry import Registry

__all__ = ["MODEL_REGISTRY", "create_model", "list_models", "register_model", "unregister_model"]

ModelFn = Callable[..., nn.Module]


def _check_callable(name: str, fn: ModelFn) -> None:
    if not callable(fn):
        raise TypeError(f"model {name!r} must be a callable returning an nn.Module, got {type(fn).__name__}")


MODEL_REGISTRY: Registry[ModelFn] = Registry("model", check=_check_callable)
MODEL_REGISTRY.register("resnet10", resnet10)
MODEL_REGISTRY.register("resnet18", resnet18)
MODEL_REGISTRY.register("resnet34", resnet34)
MODEL_REGISTRY.register("resnet50", resnet50)
MODEL_REGISTRY.register("mobilenet_v2", mobilenet_v2)


def register_model(name: str, fn: Optional[ModelFn] = None, *, overwrite: bool = False) -> Any:
    """Add ``fn`` to :data:`MODEL_REGISTRY` under ``name``; usable as a decorator
    (``@register_model("bert_tiny")``). Returns ``fn``."""
    return MODEL_REGISTRY.register(name, fn, overwrite=overwrite)


def unregister_model(name: str) -> None:
    """Remove a registered model (``KeyError`` listing the registered ones if absent)."""
    MODEL_REGISTRY.unregister(name)


def list_models() -> List[str]:
    """Sorted names of all registered models."""
    return MODEL_REGISTRY.names()


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    The result records ``{"name": name, "kwargs": kwargs}`` as
    ``model.padnet_state.model_spec`` (unless the factory recorded a richer
    spec itself) so the same architecture can be rebuilt later (``padnet.load``).
    Raises ``ValueError`` for an unknown name.
    """
    fn = MODEL_REGISTRY.get(name)
    model = fn(**kwargs)
    return record_spec(model, name, dict(kwargs))
