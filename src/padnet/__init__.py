"""padnet: partially dynamic networks (PAD-Net) for PyTorch.

Convert a model (:func:`dynamize_`), partition its modes (:func:`partition_`),
count its deployable size (:func:`count_parameters`), ship it small
(:func:`compact_`, :func:`save`, :func:`load`).
"""

__version__ = "0.1.0"

from .analysis.counting import ParameterCount, count_parameters, layer_counts  # noqa: E402
from .analysis.flops import count_flops  # noqa: E402
from .config import PadConfig  # noqa: E402
from .convert import dynamize_  # noqa: E402
from .export.compact import compact_  # noqa: E402
from .partition import PartitionReport, SymmetricModesWarning, list_criteria, partition_, register_criterion  # noqa: E402
from .serialization import CheckpointError, load, save  # noqa: E402
from .transforms.diagnostics import measure_routing  # noqa: E402
from .transforms.transitions import ModeTransition, TransitionReport, set_modes_  # noqa: E402
from .transforms.gates import ModeGates  # noqa: E402

__all__ = [
    "PadConfig",
    "dynamize_",
    "count_parameters",
    "layer_counts",
    "ParameterCount",
    "count_flops",
    "compact_",
    "partition_",
    "PartitionReport",
    "SymmetricModesWarning",
    "register_criterion",
    "list_criteria",
    "save",
    "load",
    "CheckpointError",
    "set_modes_",
    "ModeTransition",
    "TransitionReport",
    "measure_routing",
    "ModeGates",
]
