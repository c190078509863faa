"""``compact_``: replace PAD layers by deploy forms that store only live entries."""

from __future__ import annotations

from torch import nn

from ..layers.dynamic_conv import CompactDynamicConv2d, DynamicConv2d
from ..layers.modes import is_compact_layer, pad_layers


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


def compact_(model: nn.Module, fold_bn: bool = False) -> nn.Module:
    """Swap every PAD layer of ``model`` for its deploy form, in place; returns ``model``.

    The deploy form stores static entries once and dynamic entries K times,
    with lambda_s and lambda_d folded in; its outputs equal the PAD layer's.
    Each dynamic conv picks its fastest valid path from its mask (plain conv
    when all static, channel split when whole output channels are static or
    dynamic, weight/output space otherwise; see :class:`CompactDynamicConv2d`).
    The result is meant for inference: masks can no longer change.

    ``fold_bn=True`` also folds every BatchNorm that directly follows a dynamic
    conv into it (BatchNorms must be in eval mode; they become ``nn.Identity``);
    see :mod:`padnet.export.fold_bn`. Eval-mode outputs are unchanged up to
    float rounding. On a model that is already compact, ``fold_bn=True`` only folds.
    """
    layers = list(pad_layers(model))
    if not layers:
        if fold_bn and any(is_compact_layer(m) for m in model.modules()):
            from .fold_bn import fold_batchnorm_

            fold_batchnorm_(model)
            return model
        raise ValueError("compact_: the model has no PAD layers (run padnet.dynamize_ first)")
    if layers[0][0] == "":
        raise ValueError("compact_: the model is itself a PAD layer; use compact_layer(layer) instead")
    gated = [name for name, layer in layers if "mode_gate" in layer._modules]  # padnet.ModeGates attached
    if gated:
        raise ValueError(f"compact_: layer(s) {gated[:3]} carry learned mode gates; harden them first "
                         "(gates.harden_()), the deploy form needs fixed 0/1 masks")
    if fold_bn:  # refuse before changing anything
        from .fold_bn import check_foldable, find_conv_bn_pairs

        check_foldable(model, find_conv_bn_pairs(model, (DynamicConv2d,)))
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, compact_layer(layer))
    model.padnet_compact = True
    if fold_bn:
        from .fold_bn import fold_batchnorm_

        fold_batchnorm_(model)
    return model
