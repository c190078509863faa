"""PAD layers: dynamic convolution and mixture-of-experts with mode masks."""

from .dynamic_conv import CompactDynamicConv2d, DynamicConv2d
from .moe import (
    CompactMoEFeedForward,
    MoEFeedForward,
    collect_aux_loss,
    expert_load_stats,
    summarize_expert_load,
    update_expert_biases,
)
from .modes import ModeGroup, PackedModeGroup, ScaleFactors, is_compact_layer, is_pad_layer, pad_layers

__all__ = [
    "DynamicConv2d",
    "CompactDynamicConv2d",
    "MoEFeedForward",
    "CompactMoEFeedForward",
    "collect_aux_loss",
    "update_expert_biases",
    "expert_load_stats",
    "summarize_expert_load",
    "ModeGroup",
    "PackedModeGroup",
    "ScaleFactors",
    "is_pad_layer",
    "is_compact_layer",
    "pad_layers",
]
