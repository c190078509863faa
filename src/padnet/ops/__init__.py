"""Tensor operations behind the PAD layers (no nn.Modules, no padnet imports above this package).

Modules: :mod:`.exporting` (is a graph being captured?), :mod:`.geometry`,
:mod:`.workspace` (reused scratch buffers), :mod:`.im2col`, :mod:`.bmm_kernels`
and :mod:`.bmm_autograd` (tiled weight-space GEMM), :mod:`.conv_backends`,
:mod:`.autotune` and :mod:`.backend_selection` (which backend runs),
:mod:`.dynamic_conv` (the functional dynamic conv), :mod:`.channel_split`,
:mod:`.masked_factors` and :mod:`.masked_conv` (element-mask training without
weight-sized copies), :mod:`.fused` (C++ inference kernel, ``csrc/``; used where a cached build exists).
"""

from .autotune import autotune_cache, autotune_enabled, clear_autotune_cache, set_autotune
from .backend_selection import BACKENDS, resolve_backend, select_backend
from .bmm_kernels import TILE_BUDGET, aggregate_kernels
from .channel_split import aligned_static_rows, channel_split_conv2d, channel_split_runs_dense, merge_split_outputs
from .conv_backends import CONCRETE_BACKENDS
from .dynamic_conv import dynamic_conv2d, mix_bias
from .exporting import export_mode, is_exporting
from .geometry import ConvGeometry
from .im2col import col2im, im2col

__all__ = [
    "BACKENDS",
    "CONCRETE_BACKENDS",
    "ConvGeometry",
    "TILE_BUDGET",
    "aggregate_kernels",
    "aligned_static_rows",
    "autotune_cache",
    "autotune_enabled",
    "channel_split_conv2d",
    "channel_split_runs_dense",
    "clear_autotune_cache",
    "col2im",
    "dynamic_conv2d",
    "export_mode",
    "im2col",
    "is_exporting",
    "merge_split_outputs",
    "mix_bias",
    "resolve_backend",
    "select_backend",
    "set_autotune",
]
