"""Deploy forms and export: ``compact_`` (+ BatchNorm folding), torch.export and ONNX."""

from .compact import compact_, compact_layer
from .exporters import DEFAULT_OPSET, example_inputs_for, export_context, export_onnx, export_program, run_onnx
from .fold_bn import find_conv_bn_pairs, fold_batchnorm_

__all__ = [
    "compact_",
    "compact_layer",
    "fold_batchnorm_",
    "find_conv_bn_pairs",
    "export_program",
    "export_onnx",
    "export_context",
    "run_onnx",
    "example_inputs_for",
    "DEFAULT_OPSET",
]
