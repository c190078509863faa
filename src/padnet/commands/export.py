"""``padnet export``: write a saved padnet model as ONNX or a torch.export program."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

FORMATS = ("onnx", "torch-export")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a saved model (padnet.save file) to ONNX or torch.export, dynamic batch axis"
    )
    p.add_argument("model_path", metavar="MODEL_PATH", help="file written by padnet.save / padnet train")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="output format (default: onnx)")
    p.add_argument("--output", "-o", required=True, help="output file (.onnx or .pt2)")
    p.add_argument("--compact", action="store_true", help="compact_ PAD layers first (deploy form)")
    p.add_argument("--fold-bn", action="store_true", help="compact_ with BatchNorm folding (implies --compact)")
    p.add_argument("--batch", type=int, default=2, help="example batch size used for tracing (>= 2)")
    p.add_argument("--image-size", type=int, default=None, help="example image size (default: 32 small-input, else 224)")
    p.add_argument("--seq-len", type=int, default=16, help="example sequence length for text models")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"),
                   help="ONNX exporter: torch.onnx.export(dynamo=True) or the TorchScript tracer")
    p.add_argument("--no-verify", action="store_true", help="skip running the result against the eager model")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.serialization import load
    from ..io.exporters import example_inputs_for, export_onnx, export_program, run_onnx
    from ..transforms.compact import compact_
    from ..layers.modes import pad_layers

    if not Path(args.model_path).is_file():
        raise FileNotFoundError(f"{args.model_path}: no such file")
    if args.batch < 2:
        raise ValueError("--batch must be >= 2 (a batch of 1 would be specialised by the tracer)")
    model = load(args.model_path).eval()
    if args.compact or args.fold_bn:
        if any(True for _ in pad_layers(model)):
            compact_(model, fold_bn=args.fold_bn)
        elif args.fold_bn:
            compact_(model, fold_bn=True)
    inputs = example_inputs_for(model, batch=args.batch, image_size=args.image_size, seq_len=args.seq_len)
    out = Path(args.output)
    if args.format == "onnx":
        export_onnx(model, inputs, out, opset=args.opset, exporter=args.exporter)
    else:
        program = export_program(model, inputs)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out))
    print(f"wrote {out} ({args.format}, dynamic batch axis, {out.stat().st_size:,} bytes)")
    if args.no_verify:
        return 0
    for batch in (1, args.batch + 1):
        x = tuple(t[:1].repeat(batch, *([1] * (t.dim() - 1))) if t.shape[0] else t for t in inputs)
        x = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in x)
        with torch.no_grad():
            ref = model(*x)
        if args.format == "onnx":
            try:
                got = torch.as_tensor(run_onnx(out, *x)[0])
            except ImportError:
                print("onnxruntime not installed: skipped verification")
                return 0
        else:
            with torch.no_grad():
                got = torch.export.load(str(out)).module()(*x)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        err = float((got.detach().to(ref.dtype) - ref).abs().max())
        scale = float(ref.abs().max()) or 1.0
        print(f"verify batch {batch}: max abs error {err:.3g} (relative {err / scale:.3g})")
        if err > 1e-3 * scale + 1e-5:
            print("verification FAILED")
            return 1
    return 0
