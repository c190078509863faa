"""``padnet.registry.Registry`` and the registries built on it (criteria, schedules, recipes, models)."""

import pytest

from padnet.transforms.record import get_state

from padnet.models import MODEL_REGISTRY, create_model, register_model, unregister_model
from padnet.registry import Registry, UnknownNameError
from padnet.train.recipes import RECIPES, Recipe, get_recipe, register_recipe, unregister_recipe
from padnet.transforms.partition import (
    get_criterion,
    get_schedule,
    register_criterion,
    register_schedule,
    unregister_criterion,
    unregister_schedule,
)
from padnet.transforms.partition.criteria import CRITERIA
from padnet.transforms.partition.schedules import SCHEDULES


def one():
    return 1


def two():
    return 2


def test_register_get_names_contains_mapping():
    reg = Registry("widget")
    assert reg.register("b", two) is two
    assert reg.register("a", one) is one
    assert reg.get("a") is one and reg["b"] is two
    assert reg.names() == ["a", "b"] and sorted(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and ["unhashable"] not in reg
    assert dict(reg.items()) == {"a": one, "b": two}
    assert reg.get("c", None) is None  # dict-style default
    assert "widget" in repr(reg) and "'a'" in repr(reg)


def test_duplicate_needs_overwrite_same_object_is_idempotent():
    reg = Registry("widget")
    reg.register("a", one)
    with pytest.raises(ValueError, match="widget 'a' is already registered .*overwrite=True"):
        reg.register("a", two)
    assert reg["a"] is one  # unchanged by the refused call
    assert reg.register("a", one) is one  # same object again: no error, no change
    assert reg.register("a", two, overwrite=True) is two
    assert reg["a"] is two


def test_unregister_returns_entry_and_missing_raises_keyerror_listing_names():
    reg = Registry("widget")
    reg.register("a", one)
    reg.register("b", two)
    assert reg.unregister("a") is one
    assert reg.names() == ["b"]
    with pytest.raises(KeyError, match="widget 'a' is not registered; registered widgets: b"):
        reg.unregister("a")
    assert reg.names() == ["b"]


def test_unknown_name_error_is_key_and_value_error_and_lists_names():
    reg = Registry("criterion", plural="criteria")
    reg.register("taylor", one)
    reg.register("magnitude", two)
    for lookup in (reg.get, reg.__getitem__):
        with pytest.raises(UnknownNameError) as info:
            lookup("nope")
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        # str() is the plain message, not KeyError's repr of it
        assert str(info.value) == "unknown criterion 'nope'; registered criteria: magnitude, taylor"
    with pytest.raises(KeyError, match="registered criteria: \\(none\\)"):
        Registry("criterion", plural="criteria").get("x")
    with pytest.raises(UnknownNameError):
        reg.get(["unhashable"])


def test_decorator_use_and_check_hook():
    def must_be_callable(name, obj):
        if not callable(obj):
            raise TypeError(f"{name} is not callable")

    reg = Registry("hook", check=must_be_callable)

    @reg.register("mine")
    def mine():
        return 3

    assert reg["mine"] is mine and mine() == 3  # the decorator returns the function itself
    with pytest.raises(TypeError, match="bad is not callable"):
        reg.register("bad", 42)
    assert "bad" not in reg
    with pytest.raises(TypeError, match="non-empty string"):
        reg.register("", one)
    with pytest.raises(TypeError, match="non-empty string"):
        reg.register(3, one)
    with pytest.raises(TypeError, match="non-empty string"):
        Registry("")


# ---- the four registries behave the same way --------------------------------------------------


def _crit(group, stats, layer):
    return group.mask


def _sched(t, T, kappa, start=1.0):
    return kappa


class _Recipe(Recipe):
    name = "_registry_test_recipe"


def _model(**kwargs):
    import torch.nn as nn

    return nn.Linear(2, 2)


CASES = [
    (CRITERIA, lambda: register_criterion("_reg_test", _crit), lambda: unregister_criterion("_reg_test"),
     lambda: get_criterion("_reg_test").fn, _crit, "criterion", "criteria"),
    (SCHEDULES, lambda: register_schedule("_reg_test", _sched), lambda: unregister_schedule("_reg_test"),
     lambda: get_schedule("_reg_test"), _sched, "schedule", "schedules"),
    (RECIPES, lambda: register_recipe(_Recipe), lambda: unregister_recipe("_registry_test_recipe"),
     lambda: type(get_recipe("_registry_test_recipe")), _Recipe, "recipe", "recipes"),
    (MODEL_REGISTRY, lambda: register_model("_reg_test", _model), lambda: unregister_model("_reg_test"),
     lambda: get_state(create_model("_reg_test")).model_spec["name"] == "_reg_test" and MODEL_REGISTRY["_reg_test"],
     _model, "model", "models"),
]


@pytest.mark.parametrize("registry, register, unregister, resolve, obj, kind, plural", CASES,
                         ids=["criteria", "schedules", "recipes", "models"])
def test_every_padnet_registry_behaves_the_same(registry, register, unregister, resolve, obj, kind, plural):
    assert isinstance(registry, Registry) and registry.kind == kind and registry.plural == plural
    register()
    try:
        register()  # the same object again: idempotent
        assert resolve() is obj
        name = [n for n in registry.names() if registry[n] is obj or getattr(registry[n], "fn", None) is obj]
        assert len(name) == 1
    finally:
        unregister()
    assert obj not in [getattr(v, "fn", v) for v in registry.values()]
    with pytest.raises(KeyError, match=f"is not registered; registered {plural}: "):
        unregister()  # missing: raises everywhere (recipes used to be silent)
    with pytest.raises(ValueError, match=f"unknown {kind} '_absent_'; registered {plural}: "):
        registry.get("_absent_")
