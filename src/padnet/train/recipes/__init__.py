"""Training recipes: registry plus the built-in vision (and, when present, text) recipes.

See :mod:`padnet.train.recipes.base` for the :class:`Recipe` interface.
"""

from __future__ import annotations

from .base import (
    BUILTIN_MODULES,
    RECIPES,
    DataBundle,
    Recipe,
    call_model,
    default_logits,
    get_recipe,
    list_recipes,
    lr_factor_fn,
    register_recipe,
    unregister_recipe,
)

__all__ = [
    "BUILTIN_MODULES",
    "RECIPES",
    "DataBundle",
    "Recipe",
    "call_model",
    "default_logits",
    "get_recipe",
    "list_recipes",
    "lr_factor_fn",
    "register_recipe",
    "unregister_recipe",
]
