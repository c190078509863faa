"""padnet: partially dynamic networks (PAD-Net) for PyTorch.

Convert a model (:func:`dynamize_`), partition its modes (:func:`partition_`),
count its deployable size (:func:`count_parameters`), ship it small
(:func:`compact_`, :func:`save`, :func:`load`).

This module is the public facade: it imports the layers below; nothing inside
the library imports it (see docs/design.md).
"""

from ._version import __version__
from .io.serialization import CheckpointError, load, save
from .models import create_model  # noqa: F401  (registers the zoo and the BERT converter)
from .transforms.partition import (
    PartitionConfig,
    PartitionReport,
    SymmetricModesWarning,
    list_criteria,
    partition_,
    register_criterion,
)
from .transforms.compact import compact_
from .transforms.config import DynamicConvConfig, MoEConfig, PadConfig
from .transforms.counting import ParameterCount, count_parameters, layer_counts
from .transforms.dynamize import dynamize_
from .transforms.flops import count_flops
from .transforms.record import PadState, get_state
from .transforms.diagnostics import measure_routing
from .transforms.transitions import ModeTransition, TransitionReport, set_modes_
from .transforms.gates import ModeGates
from .transforms.scheduler import ModeScheduler

__all__ = [
    "__version__",
    "PadConfig",
    "DynamicConvConfig",
    "MoEConfig",
    "dynamize_",
    "count_parameters",
    "layer_counts",
    "ParameterCount",
    "count_flops",
    "compact_",
    "partition_",
    "PartitionConfig",
    "PartitionReport",
    "SymmetricModesWarning",
    "register_criterion",
    "list_criteria",
    "save",
    "load",
    "CheckpointError",
    "PadState",
    "get_state",
    "set_modes_",
    "ModeTransition",
    "TransitionReport",
    "measure_routing",
    "ModeGates",
    "ModeScheduler",
]
