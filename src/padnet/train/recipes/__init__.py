"""Training recipes: registry plus the built-in vision (and, when present, text) recipes.

See :mod:`padnet.train.recipes.base` for the :class:`Recipe` interface.
"""

from __future__ import annotations

import importlib

from .base import (
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

# Modules holding built-in recipes; each registers its recipes on import.
BUILTIN_MODULES = ("padnet.train.recipes.vision", "padnet.train.recipes.text")

_loaded = False


def _load_builtin() -> None:
    """Import the built-in recipe modules once (a module that does not exist is skipped)."""
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    _loaded = True


__all__ = [
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
