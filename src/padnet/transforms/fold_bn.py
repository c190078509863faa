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

Only a *plain* BatchNorm is folded: exactly ``nn.BatchNorm2d``, or a subclass
that neither overrides ``forward`` nor has submodules or hooks. A norm module
that does more (e.g. BatchNorm + activation fused in one module, as model
libraries ship) is kept as it is and reported with a warning: replacing it by
``nn.Identity`` would silently drop what it does.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..layers.dynamic_conv import CompactDynamicConv2d
from .conversion import swap_module
from .record import get_state

__all__ = ["find_conv_bn_pairs", "check_foldable", "fold_batchnorm_", "is_plain_batchnorm", "UnfoldedNormWarning"]


class UnfoldedNormWarning(UserWarning):
    """A BatchNorm2d subclass after a dynamic conv was kept because it may do more than normalise."""


def is_plain_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is provably a per-channel affine BatchNorm2d (foldable)."""
    if not isinstance(module, nn.BatchNorm2d):
        return False
    if type(module) is nn.BatchNorm2d:
        return not (module._forward_hooks or module._forward_pre_hooks)
    return (
        type(module).forward is nn.BatchNorm2d.forward
        and not any(True for _ in module.children())
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def _adjacent_pairs(model: nn.Module, conv_types) -> list[tuple[str, str, nn.Module]]:
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
                pairs.append((prefix + name, prefix + next_name, nxt))
    return pairs


def find_conv_bn_pairs(model: nn.Module, conv_types=(CompactDynamicConv2d,)) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every conv of ``conv_types`` whose next sibling is a plain BatchNorm2d."""
    return [(c, b) for c, b, bn in _adjacent_pairs(model, conv_types) if is_plain_batchnorm(bn)]


def unfoldable_norms(model: nn.Module, conv_types=(CompactDynamicConv2d,)) -> list[tuple[str, str]]:
    """``(bn_name, type name)`` of BatchNorm2d subclasses after a conv that are not provably plain."""
    return [(b, type(bn).__name__) for _, b, bn in _adjacent_pairs(model, conv_types) if not is_plain_batchnorm(bn)]


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
    """Fold every plain BatchNorm that directly follows a deploy-form dynamic conv; BN becomes ``nn.Identity``.

    The BatchNorms must be in eval mode (``model.eval()``): a training-mode
    BatchNorm normalises with batch statistics and cannot be folded. Norm
    modules that are not provably plain are kept (:class:`UnfoldedNormWarning`).
    Returns the folded ``(conv_name, bn_name)`` pairs and records them in
    ``model.padnet_state`` (op ``"fold_bn"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm_ expects an nn.Module, got {type(model).__name__}")
    pairs = find_conv_bn_pairs(model)
    check_foldable(model, pairs)
    kept = unfoldable_norms(model)
    if kept:
        warnings.warn(
            "fold_bn: kept (not folded) norm modules that may do more than a plain BatchNorm2d "
            f"(overridden forward, submodules or hooks): {kept}", UnfoldedNormWarning, stacklevel=2,
        )
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        conv.fold_batchnorm_(model.get_submodule(bn_name))
        swap_module(model, bn_name, nn.Identity())
    if pairs:
        get_state(model).append("fold_bn", pairs=[list(p) for p in pairs])
    return pairs


def replay_fold_bn_(model: nn.Module, pairs: list[list[str]]) -> None:
    """Rebuild the architecture of a folded model (BN -> Identity); the folded weights come from a file."""
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            raise ValueError(f"fold_bn step: a pair must be [conv_name, bn_name], got {pair!r}")
        conv_name, bn_name = pair
        try:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        except AttributeError as exc:
            raise ValueError(f"fold_bn step: {pair} does not name modules of the model ({exc})") from None
        if not isinstance(conv, CompactDynamicConv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"fold_bn step: {conv_name!r} is a {type(conv).__name__} and {bn_name!r} a "
                             f"{type(bn).__name__}; expected a compact dynamic conv and a BatchNorm2d")
        swap_module(model, bn_name, nn.Identity())
    get_state(model).append("fold_bn", pairs=[list(p) for p in pairs])
