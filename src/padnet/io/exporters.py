"""torch.export and ONNX export of static, dynamic, PAD and compact models.

Every exporter runs the model in eval mode inside
:func:`padnet.ops.exporting.export_mode`, where

- dynamic convolutions use a batch-agnostic backend (``"bmm"`` via strided-slice
  im2col + batched MatMul, or ``"output"`` for depthwise / tiny outputs) --
  never the grouped conv with ``groups = B``, which would freeze the batch size;
- MoE dispatch computes every expert on every token and gates with the top-k
  mask (``impl="dense"``): no data-dependent shapes, ``E / k`` times the
  expert FLOPs of the eager sorted dispatch.

The batch axis (dim 0 of every tensor input) is dynamic; spatial sizes and
sequence lengths are fixed to those of the example input.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..ops.exporting import export_mode
from ..transforms.record import find_state

__all__ = [
    "DEFAULT_OPSET",
    "export_program",
    "export_onnx",
    "run_onnx",
    "example_inputs_for",
    "export_context",
]

DEFAULT_OPSET = 18
ONNX_EXPORTERS = ("dynamo", "torchscript")


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


@contextlib.contextmanager
def export_context(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode + :func:`export_mode`; restores training flags and MoE bookkeeping afterwards.

    MoE layers set ``aux_loss`` / ``last_expert_counts`` in every forward;
    tracing would leave fake or traced tensors there, so they are restored.
    """
    from ..layers.moe import _MoERouting

    was_training = {m: m.training for m in model.modules()}
    saved = {}
    patched = []
    for m in model.modules():
        for attr in ("aux_loss", "last_expert_counts"):
            if isinstance(getattr(m, attr, None), Tensor):
                saved[(m, attr)] = getattr(m, attr)
        if isinstance(m, _MoERouting) and "route" not in m.__dict__:
            m.route = types.MethodType(_export_route, m)
            patched.append(m)
    model.eval()
    try:
        with export_mode():
            yield model
    finally:
        for m in patched:
            del m.route
        for m, flag in was_training.items():
            m.training = flag
        for (m, attr), value in saved.items():
            setattr(m, attr, value)


def _export_route(self, x_flat: Tensor):
    """MoE routing without the load-balancing bookkeeping (inference export).

    The eager ``route`` also computes the auxiliary loss with
    ``float(n * top_k)``, which would specialise the token count (and so the
    batch axis) to the example's; the exported graph needs only the top-k
    indices and gates.
    """
    topk_idx, topk_gates, _ = self.select_experts(x_flat)
    return topk_idx, topk_gates


def _batch_dynamic_shapes(inputs: tuple, max_batch: int):
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return tuple({0: batch} if isinstance(t, Tensor) and t.dim() > 0 else None for t in inputs)


def export_program(
    model: nn.Module,
    example_inputs,
    *,
    dynamic_batch: bool = True,
    max_batch: int = 4096,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (eval mode, export paths), batch axis dynamic.

    Use an example batch of at least 2: a batch of 1 would be specialised.
    ``ep.module()(x)`` runs the program; ``torch.export.save(ep, "m.pt2")`` stores it.
    """
    inputs = _as_tuple(example_inputs)
    dynamic_shapes = _batch_dynamic_shapes(inputs, max_batch) if dynamic_batch else None
    with export_context(model):
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=strict)


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: str = "dynamo",
    max_batch: int = 4096,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as ONNX (opset >= 17) with a dynamic batch axis; returns the path.

    ``exporter="dynamo"`` uses ``torch.onnx.export(..., dynamo=True)`` (via
    torch.export); ``"torchscript"`` the TorchScript-based tracer (faster to
    run, deprecated upstream). Both produce the same graph semantics here.
    """
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; expected one of {ONNX_EXPORTERS}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    inputs = _as_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names or [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))])
    with export_context(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dynamic_shapes = _batch_dynamic_shapes(inputs, max_batch) if dynamic_batch else None
            program = torch.onnx.export(
                model, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                input_names=names, output_names=list(output_names) if output_names else None, verbose=False,
            )
            program.save(str(path))
        else:
            outs = list(output_names or ["output"])
            axes = {n: {0: "batch"} for n in names + outs} if dynamic_batch else None
            torch.onnx.export(
                model, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                output_names=outs, dynamic_axes=axes, do_constant_folding=True,
            )
    return path


def run_onnx(path: str | Path, *inputs: Tensor) -> list:
    """Run an ONNX file with onnxruntime (CPU) on torch tensors; returns numpy outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {meta.name: t.detach().cpu().numpy() for meta, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def example_inputs_for(model: nn.Module, batch: int = 2, image_size: int | None = None,
                       seq_len: int = 16) -> tuple[Any, ...]:
    """A plausible example input for a zoo model: images ``[B, in_chans, S, S]`` or token ids ``[B, T]``."""
    state = find_state(model)
    spec = (state.model_spec if state is not None else None) or {}
    kwargs = spec.get("kwargs", {})
    in_chans = getattr(model, "in_chans", kwargs.get("in_chans"))
    if in_chans is not None:
        size = image_size or (32 if getattr(model, "small_input", kwargs.get("small_input", False)) else 224)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return (torch.randn(batch, int(in_chans), size, size, dtype=dtype),)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError("cannot infer an example input for this model; pass --input-shape (images) explicitly")
    return (torch.randint(0, int(vocab), (batch, seq_len)),)
