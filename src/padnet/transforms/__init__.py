"""Transforms of a model: configure, convert (dynamize), compact, fold BatchNorm, count.

Layer: imports ``padnet.layers`` (and ``padnet.ops``) only. Every transform
records itself in the model's :class:`~padnet.transforms.record.PadState`.
"""

from .compact import compact_, compact_layer
from .config import DynamicConvConfig, MoEConfig, PadConfig, check_ratio
from .conversion import (
    Converter, Site, deploy_form, find_sites, register_converter, register_deploy_form, swap_module,
    unregister_converter,
)
from .counting import ParameterCount, count_parameters, layer_counts
from .dynamize import dynamize_, select_targets
from .flops import count_flops
from .fold_bn import UnfoldedNormWarning, find_conv_bn_pairs, fold_batchnorm_, is_plain_batchnorm
from .record import PadState, find_state, get_state

__all__ = [
    "PadConfig",
    "DynamicConvConfig",
    "MoEConfig",
    "check_ratio",
    "dynamize_",
    "select_targets",
    "Converter",
    "Site",
    "register_converter",
    "unregister_converter",
    "find_sites",
    "swap_module",
    "register_deploy_form",
    "deploy_form",
    "compact_",
    "compact_layer",
    "fold_batchnorm_",
    "find_conv_bn_pairs",
    "is_plain_batchnorm",
    "UnfoldedNormWarning",
    "ParameterCount",
    "count_parameters",
    "layer_counts",
    "count_flops",
    "PadState",
    "get_state",
    "find_state",
]
