"""ONNX file size and export time: dynamo vs TorchScript exporter on a compact PAD ResNet-10.

    PYTHONPATH=src python3 benchmarks/bench_onnx_size.py

Builds ResNet-10 (small input, 1 channel, width 0.5), dynamizes it (K=4),
partitions it to kappa 0.3 with the data-free magnitude criterion, compacts it,
and exports it with both ONNX exporters; prints the compact safetensors size
and each ONNX file's size (external data included) and export time. The result
decides ``padnet export --exporter auto`` (docs/export.md).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import padnet
from padnet.io.exporters import export_onnx
from padnet.models import create_model


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=0.5)
    padnet.dynamize_(model, padnet.PadConfig(dynamic_ratio=1.0, seed=0))
    padnet.partition_(model, None, None, ratio=0.3, criterion="magnitude", iterations=1)
    padnet.compact_(model.eval())
    x = torch.randn(2, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        padnet.save(model, tmp / "compact.safetensors")
        print(f"compact safetensors: {os.path.getsize(tmp / 'compact.safetensors'):,} bytes")
        for exporter in ("dynamo", "torchscript"):
            out = tmp / exporter / "model.onnx"
            t0 = time.perf_counter()
            export_onnx(model, (x,), out, exporter=exporter)
            seconds = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in out.parent.iterdir())
            print(f"{exporter:12s} {size:>12,} bytes  {seconds:6.1f} s")


if __name__ == "__main__":
    main()
