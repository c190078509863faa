"""``compact_``: replace PAD layers by deploy forms that store only live entries."""

from __future__ import annotations

from torch import nn

from ..layers.dynamic_conv import DynamicConv2d
from ..layers.modes import is_compact_layer, is_pad_layer, pad_layers
from .conversion import deploy_form, swap_module
from .gates import LayerGate
from .fold_bn import check_foldable, find_conv_bn_pairs, fold_batchnorm_
from .record import get_state

__all__ = ["compact_", "compact_layer"]


def compact_layer(layer: nn.Module) -> nn.Module:
    """Deploy form of one PAD layer (same outputs, dead entries dropped, scales folded).

    The builder is the one registered for the layer's type
    (:func:`padnet.transforms.conversion.register_deploy_form`).
    """
    if not is_pad_layer(layer):
        raise TypeError(f"compact_layer expects a PAD layer, got {type(layer).__name__}")
    return deploy_form(layer)


def compact_(model: nn.Module, fold_bn: bool = False) -> nn.Module:
    """Swap every PAD layer of ``model`` for its deploy form, in place; returns ``model``.

    The deploy form stores static entries once and dynamic entries K times,
    with lambda_s and lambda_d folded in; its outputs equal the PAD layer's.
    Each dynamic conv picks its fastest valid path from its mask (plain conv
    when all static, channel split when whole output channels are static or
    dynamic, weight/output space otherwise; see :class:`CompactDynamicConv2d`).
    The result is meant for inference: masks can no longer change.

    ``fold_bn=True`` also folds every plain BatchNorm2d that directly follows a
    dynamic conv into it (BatchNorms must be in eval mode; they become
    ``nn.Identity``); see :mod:`padnet.transforms.fold_bn`. Eval-mode outputs are
    unchanged up to float rounding. On a model that is already compact,
    ``fold_bn=True`` only folds. Both steps are recorded in ``model.padnet_state``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compact_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(fold_bn, bool):
        raise TypeError(f"compact_: fold_bn must be True or False, got {fold_bn!r}")
    layers = list(pad_layers(model))
    if not layers:
        if any(is_compact_layer(m) for m in model.modules()):
            if fold_bn:
                fold_batchnorm_(model)
                return model
            raise ValueError("compact_: the model is already in deploy (compact) form; nothing to do")
        raise ValueError("compact_: the model has no PAD layers (run padnet.dynamize_ first)")
    if layers[0][0] == "":
        raise ValueError("compact_: the model is itself a PAD layer; use compact_layer(layer) instead")
    gated = [name for name, layer in layers if isinstance(getattr(layer, "mode_gate", None), LayerGate)]
    if gated:  # padnet.ModeGates attached: the deploy form needs fixed 0/1 masks
        raise ValueError(f"compact_: layer(s) {gated[:3]} carry learned mode gates; harden them first "
                         "(gates.harden_())")
    if fold_bn:  # refuse before changing anything
        check_foldable(model, find_conv_bn_pairs(model, (DynamicConv2d,)))
    for name, layer in layers:
        swap_module(model, name, compact_layer(layer))
    get_state(model).append("compact", layers=[name for name, _ in layers])
    if fold_bn:
        fold_batchnorm_(model)
    return model
