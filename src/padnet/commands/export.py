"""``padnet export``: write a saved padnet model as ONNX, a torch.export program or compact safetensors.

The example input (what the exported graph is specialised to, apart from the
batch axis) comes, in this order, from ``--input-shape``, ``--image-size`` /
``--seq-len``, the input record a ``padnet train`` run saves with its model
(image channels and size, sequence length), and finally the zoo model spec
(``in_chans``; 32 px for small-input models, else 224; 16 tokens).

Every export is verified against the eager model on fresh random inputs at two
batch sizes (skip with ``--no-verify``); non-finite outputs fail the check.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("onnx", "torch-export", "safetensors")
EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_SEQ_LEN = 16


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a saved model to ONNX, torch.export or compact safetensors (dynamic batch axis)",
        description="Export a model written by padnet.save or padnet train (MODEL_PATH may be a run directory). "
                    "See docs/export.md.",
    )
    p.add_argument("model_path", metavar="MODEL_PATH", help="file written by padnet.save, or a padnet train run dir")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx (default), torch-export (.pt2) or safetensors (padnet.save file; with --compact the "
                        "deploy form)")
    p.add_argument("--output", "-o", required=True, help="output file (.onnx, .pt2 or .safetensors)")
    p.add_argument("--compact", action="store_true", help="compact_ PAD layers first (deploy form)")
    p.add_argument("--fold-bn", action="store_true", help="compact_ with BatchNorm folding (implies --compact)")
    p.add_argument("--batch", type=int, default=2, help="example batch size used for tracing (>= 2)")
    p.add_argument("--input-shape", default=None, metavar="DIMS",
                   help="per-sample input shape without the batch axis, comma separated: C,H,W for images "
                        "(e.g. 1,28,28), T for token ids (e.g. 64); overrides the saved record")
    p.add_argument("--image-size", type=int, default=None,
                   help="example image size (default: the run's record, else 32 small-input / 224)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"example sequence length for text models (default: the run's max_length, else "
                        f"{DEFAULT_SEQ_LEN})")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS,
                   help="ONNX exporter: auto (default: dynamo, the smaller file -- 11.8 MB vs 36.6 MB for a compact "
                        "ResNet-10; TorchScript only if dynamo fails), dynamo, or torchscript")
    p.add_argument("--no-verify", action="store_true", help="skip running the result against the eager model")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ inputs


def parse_input_shape(text: str) -> list[int]:
    """``"1,28,28"`` -> ``[1, 28, 28]``; every dimension an integer >= 1."""
    try:
        dims = [int(d) for d in str(text).replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--input-shape must be comma-separated integers (C,H,W or T), got {text!r}") from None
    if not dims or len(dims) > 4 or any(d < 1 for d in dims):
        raise ValueError(f"--input-shape must be 1 to 4 integers >= 1 (C,H,W or T), got {text!r}")
    if any(d > 1 << 16 for d in dims):
        raise ValueError(f"--input-shape {text!r}: a dimension above 65536 is not an example input")
    return dims


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _is_text(model: nn.Module) -> bool:
    from .common import text_vocab_size

    return not hasattr(model, "in_chans") and text_vocab_size(model) is not None


def example_inputs(model: nn.Module, batch: int = 2, *, input_shape: str | None = None,
                   image_size: int | None = None, seq_len: int | None = None,
                   metadata: dict[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
    """The example input for tracing ``model`` (see the module docstring for the order of sources).

    ``metadata``: the ``extra`` header of the file the model came from (a run's ``input`` record).
    """
    from ..transforms.record import find_state
    from .common import text_vocab_size

    record = (metadata or {}).get("input") or {}
    state = find_state(model)
    spec_kwargs = ((state.model_spec if state is not None else None) or {}).get("kwargs", {})
    if _is_text(model):
        vocab = text_vocab_size(model)
        if input_shape is not None:
            dims = parse_input_shape(input_shape)
            if len(dims) != 1:
                raise ValueError(f"--input-shape for a text model is the sequence length T, got {input_shape!r}")
            seq_len = dims[0]
        if image_size is not None:
            raise ValueError("--image-size does not fit a text model; use --seq-len")
        if seq_len is None:
            seq_len = int(record.get("seq_len") or DEFAULT_SEQ_LEN)
        max_pos = getattr(getattr(getattr(model, "encoder", None), "config", None), "max_position_embeddings", None)
        if max_pos is not None and seq_len > int(max_pos):
            raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
        if seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
        return (torch.randint(0, vocab, (batch, seq_len)),)
    if seq_len is not None:
        raise ValueError("--seq-len is for text models; this is an image model (use --image-size or --input-shape)")
    in_chans = getattr(model, "in_chans", spec_kwargs.get("in_chans"))
    if input_shape is not None:
        shape = parse_input_shape(input_shape)
    elif record.get("kind") in ("image", "tensor") and record.get("shape"):
        shape = [int(d) for d in record["shape"]]
        if image_size is not None and len(shape) == 3:
            shape = [shape[0], image_size, image_size]
    elif in_chans is not None:
        small = getattr(model, "small_input", spec_kwargs.get("small_input", False))
        size = image_size or (32 if small else 224)
        shape = [int(in_chans), size, size]
    else:
        raise ValueError("cannot infer an example input for this model (no run record, no zoo spec); pass "
                         "--input-shape C,H,W (images) or T (token ids)")
    if in_chans is not None and len(shape) == 3 and shape[0] != int(in_chans):
        raise ValueError(f"--input-shape {shape} has {shape[0]} channel(s) but the model takes {in_chans}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    return (torch.randn(batch, *shape, dtype=_float_dtype(model)),)


# ---------------------------------------------------------------- verification


def compare_outputs(ref: Any, got: Any, rtol: float = 1e-3, atol: float = 1e-5) -> tuple[bool, float, str]:
    """``(ok, max abs error, message)``; fails on any NaN/inf in either output or error above tolerance.

    Written as ``not err <= tol`` so that a NaN error can never pass.
    """
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = torch.as_tensor(got if not isinstance(got, (list, tuple)) else got[0]).detach().to(ref.dtype)
    if got.shape != ref.shape:
        return False, math.inf, f"output shape {tuple(got.shape)} differs from the model's {tuple(ref.shape)}"
    if not bool(torch.isfinite(ref).all()):
        return False, math.nan, "the eager model itself produced NaN/inf outputs"
    if not bool(torch.isfinite(got).all()):
        return False, math.nan, "the exported model produced NaN/inf outputs"
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    tol = rtol * (scale or 1.0) + atol
    ok = err <= tol  # False for NaN
    return ok, err, f"max abs error {err:.3g} (relative {err / (scale or 1.0):.3g})"


# --------------------------------------------------------------------- verb


def resolve_model_path(path: str | Path) -> Path:
    """A model file, or ``RUN_DIR/model.safetensors`` for a run directory."""
    from ..train.outputs import MODEL

    path = Path(path)
    if path.is_dir():
        if (path / MODEL).is_file():
            return path / MODEL
        raise FileNotFoundError(f"{path} is a directory without {MODEL} (not a finished padnet train run)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def export_onnx_auto(model: nn.Module, inputs: tuple, out: Path, opset: int, exporter: str) -> str:
    """ONNX export; ``auto`` tries dynamo (smaller files) then falls back to TorchScript. Returns the one used."""
    from ..io.exporters import export_onnx

    if exporter != "auto":
        export_onnx(model, inputs, out, opset=opset, exporter=exporter)
        return exporter
    try:
        export_onnx(model, inputs, out, opset=opset, exporter="dynamo")
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure: the TorchScript tracer is the fallback
        print(f"dynamo ONNX exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
              f"); falling back to the TorchScript exporter")
        export_onnx(model, inputs, out, opset=opset, exporter="torchscript")
        return "torchscript"


def run(args: argparse.Namespace) -> int:
    from ..io.exporters import export_program, run_onnx
    from ..io.serialization import load, read_metadata, save
    from ..layers.modes import pad_layers
    from ..transforms.compact import compact_

    model_path = resolve_model_path(args.model_path)
    if args.batch < 2:
        raise ValueError("--batch must be >= 2 (a batch of 1 would be specialised by the tracer)")
    out = Path(args.output)
    _check_writable(out)
    model = load(model_path).eval()
    metadata = dict(read_metadata(model_path).get("extra") or {})
    if args.compact or args.fold_bn:
        if any(True for _ in pad_layers(model)):
            compact_(model, fold_bn=args.fold_bn)
        elif args.fold_bn:
            compact_(model, fold_bn=True)
    inputs = example_inputs(model, args.batch, input_shape=args.input_shape, image_size=args.image_size,
                            seq_len=args.seq_len, metadata=metadata)
    shape = "x".join(str(d) for d in inputs[0].shape[1:])
    used = args.format
    if args.format == "onnx":
        used = f"onnx via {export_onnx_auto(model, inputs, out, args.opset, args.exporter)}"
    elif args.format == "torch-export":
        program = export_program(model, inputs)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out))
    else:
        save(model, out, extra=metadata)
    what = ("padnet.save file, any batch size" if args.format == "safetensors"
            else f"dynamic batch axis, example input [batch, {shape}]")
    print(f"wrote {out} ({used}, {what}, {out.stat().st_size:,} bytes)")
    if args.no_verify:
        return 0
    exported = None
    if args.format == "torch-export":
        exported = torch.export.load(str(out)).module()
    elif args.format == "safetensors":
        exported = load(out).eval()
    from .common import text_vocab_size

    vocab = text_vocab_size(model) if _is_text(model) else None
    for batch in (1, args.batch + 1):
        x = tuple(torch.randn(batch, *t.shape[1:], dtype=t.dtype) if t.is_floating_point()
                  else torch.randint(0, vocab or 2, (batch, *t.shape[1:])) for t in inputs)
        with torch.no_grad():
            ref = model(*x)
            if args.format == "onnx":
                try:
                    got = run_onnx(out, *x)[0]
                except ImportError:
                    print("onnxruntime not installed: skipped verification")
                    return 0
            else:
                got = exported(*x)
        ok, _, message = compare_outputs(ref, got)
        print(f"verify batch {batch}: {message}")
        if not ok:
            print("verification FAILED")
            return 1
    return 0


def _check_writable(out: Path) -> None:
    """Fail before any work when the output cannot be written (missing permission, a directory)."""
    import os

    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write {out}: {probe} is not writable")
