"""``compact_``: replace PAD layers by deploy forms that store only live entries."""

from __future__ import annotations

from torch import nn

from ..layers.dynamic_conv import CompactDynamicConv2d, DynamicConv2d
from ..layers.modes import pad_layers


def compact_layer(layer: nn.Module) -> nn.Module:
    """Deploy form of one PAD layer (same outputs, dead entries dropped, scales folded)."""
    if isinstance(layer, DynamicConv2d):
        compact = CompactDynamicConv2d(layer)
    else:
        from ..layers.moe import CompactMoEFeedForward, MoEFeedForward

        if not isinstance(layer, MoEFeedForward):
            raise TypeError(f"no deploy form for {type(layer).__name__}")
        compact = CompactMoEFeedForward.from_layer(layer)
    return compact.train(layer.training)


def compact_(model: nn.Module) -> nn.Module:
    """Swap every PAD layer of ``model`` for its deploy form, in place; returns ``model``.

    The deploy form stores static entries once and dynamic entries K times,
    with lambda_s and lambda_d folded in; its outputs equal the PAD layer's.
    The result is meant for inference: masks can no longer change.
    """
    layers = list(pad_layers(model))
    if not layers:
        raise ValueError("compact_: the model has no PAD layers (run padnet.dynamize_ first)")
    if layers[0][0] == "":
        raise ValueError("compact_: the model is itself a PAD layer; use compact_layer(layer) instead")
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, compact_layer(layer))
    model.padnet_compact = True
    return model
