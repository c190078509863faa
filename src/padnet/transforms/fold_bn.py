"""Fold BatchNorm layers into the dynamic convolutions they directly follow.

A BatchNorm in eval mode is an affine map per channel, ``BN(y) = a * y + c``
with ``a = gamma / sqrt(running_var + eps)`` and ``c = beta - a * running_mean``.
A dynamic conv is linear in its kernel, so scaling every factor (static and
the K dynamic ones) along the output channel by ``a`` scales the per-sample
kernel ``sum_k pi_k W_k + W_s`` by ``a`` for *any* routing weights. The shift
``c`` must stay input-independent: it goes into a static bias entry, or into
every dynamic bias factor only when the routing weights sum to one (softmax);
otherwise into a separate static ``bias_shift`` (see
:meth:`CompactDynamicConv2d.fold_batchnorm_`).

"Directly follows" is read from module registration order in the parent:
``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``, ``downsample.0``/``downsample.1``
of the zoo ResNets and ``Sequential(conv, bn, act)`` of MobileNetV2 -- the
order these models (and torchvision's) use in ``forward``.
"""

from __future__ import annotations

from torch import nn

from ..layers.dynamic_conv import CompactDynamicConv2d


def find_conv_bn_pairs(model: nn.Module, conv_types=(CompactDynamicConv2d,)) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every conv of ``conv_types`` whose next sibling is a matching BatchNorm2d."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (name, child), (next_name, nxt) in zip(children, children[1:]):
            if (
                isinstance(child, conv_types)
                and isinstance(nxt, nn.BatchNorm2d)
                and nxt.num_features == child.out_channels
            ):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + name, prefix + next_name))
    return pairs


def check_foldable(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Raise ``ValueError`` if a BatchNorm of ``pairs`` cannot be folded (training mode, no running stats)."""
    for _, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if bn.training:
            raise ValueError(
                f"fold_bn: {bn_name} is in training mode; BatchNorm folding needs eval mode (call model.eval() first)"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"fold_bn: {bn_name} has no running statistics (track_running_stats=False)")


def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a deploy-form dynamic conv; BN becomes ``nn.Identity``.

    The BatchNorms must be in eval mode (``model.eval()``): a training-mode
    BatchNorm normalises with batch statistics and cannot be folded. Returns
    the folded ``(conv_name, bn_name)`` pairs. Sets ``model.padnet_fold_bn = True``.
    """
    pairs = find_conv_bn_pairs(model)
    check_foldable(model, pairs)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        conv.fold_batchnorm_(model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    if pairs:
        model.padnet_fold_bn = True
    return pairs
