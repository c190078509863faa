"""Files and export formats: ``save`` / ``load`` (safetensors + the transform record), torch.export, ONNX.

Layer: imports ``padnet.transforms``, ``padnet.layers`` and ``padnet.models``
(to rebuild zoo architectures); never the apps (train, commands, cli).
"""

from .exporters import DEFAULT_OPSET, example_inputs_for, export_context, export_onnx, export_program, run_onnx
from .serialization import CheckpointError, load, read_file, read_metadata, save

__all__ = [
    "save",
    "load",
    "read_file",
    "read_metadata",
    "CheckpointError",
    "export_program",
    "export_onnx",
    "export_context",
    "run_onnx",
    "example_inputs_for",
    "DEFAULT_OPSET",
]
