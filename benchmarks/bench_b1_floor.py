"""Where the fully dynamic ResNet-18's batch-1 time goes, and the floor that mixing K kernels sets.

    python benchmarks/bench_b1_floor.py [--repeats 15] [--profiled 10]

At batch 1 a dynamic conv first mixes its K kernels into one (``pi @ W``, a
GEMV over K x the layer's weights) and then runs a plain conv, so the model
reads K times the static model's weights per image. This script measures, in
one process (2 threads, float32, K = 4, the `models` suite's ResNet-18 on
32 x 32 inputs, every conv but the stem dynamic):

- the batch-1 forward of the static and the fully dynamic model (interleaved
  medians);
- the time inside the dynamic forward spent in the mixing GEMVs (``aten::mm``
  self time under ``torch.profiler``, per forward; the routers' Linears are
  ``aten::addmm`` and not counted);
- the same GEMVs alone, back to back in model order on the model's own
  weights (interleaved medians), and the bandwidth they reach;
- the floor "static forward + mixing alone": what the dynamic model would cost
  if everything but the weight stream were free and streaming never overlapped
  the convs;
- per layer, on each dynamic conv's own input: the plain conv alone, its GEMV
  alone and the dynamic layer alone (interleaved medians). A layer cannot beat
  the larger of its conv and its kernel stream, so "static forward - its convs +
  sum over layers of max(conv, GEMV)" is a floor that allows full overlap; the
  rows per layer shape show where the dynamic layers spend time above it.

Rows: ``part``, ``ms`` and ``ratio`` (to the static forward of the same
process); run it in fresh processes with ``benchmarks/fresh.py``.
"""

from __future__ import annotations

from _common import base_parser, log, setup, write

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import latency

MIX_OPS = ("aten::mm",)  # fully dynamic: the mix has no static part (an addmm here is a router's Linear)


def mixing_inputs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(pi [1, K], W [K, P])`` of every dynamic conv of ``model`` in module order (fully dynamic: the
    factors the batch-1 path mixes)."""
    from padnet.layers import DynamicConv2d

    out = []
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            w = m.weight_dynamic.detach()
            pi = torch.softmax(torch.randn(1, w.shape[0], generator=gen), dim=-1)
            out.append((pi, w.reshape(w.shape[0], -1)))
    return out


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """``(layer, its input)`` of every dynamic conv of ``model`` in module order, from one forward of ``x``."""
    from padnet.layers import DynamicConv2d

    seen: dict[int, torch.Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(id(m), args[0].detach().clone()))
             for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(m, seen[id(m)]) for m in layers]


def layer_label(layer: torch.nn.Module, x: torch.Tensor) -> str:
    """``"<in>-><out> k<kh> s<stride> @<H>"``: the layer shape the per-layer rows are summed by."""
    return (f"{layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} s{layer.stride[0]} "
            f"@{x.shape[-1]}")


def profiled_mix_ms(model: torch.nn.Module, x: torch.Tensor, forwards: int) -> tuple[float, float]:
    """(ms per forward in the mixing ops, ms per forward in all ops) from ``torch.profiler`` self times."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(x)
    mix = total = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        if event.key in MIX_OPS:
            mix += event.self_cpu_time_total
    return mix / 1e3 / forwards, total / 1e3 / forwards


def main() -> None:
    p = base_parser(__doc__)
    p.set_defaults(repeats=15)
    p.add_argument("--profiled", type=int, default=10, help="forwards under torch.profiler")
    args = p.parse_args()
    info = setup(args)
    static = latency.build_model_variant("static")
    dynamic = latency.build_model_variant("dynamic")
    x = torch.randn(1, 3, 32, 32)
    gemvs = mixing_inputs(dynamic)
    nbytes = sum((w.numel() + w.shape[1]) * w.element_size() for _, w in gemvs)  # read K x P, write P

    def run_gemvs():
        for pi, w in gemvs:
            torch.mm(pi, w)

    layers = layer_inputs(dynamic, x)
    fns = {"static": lambda: static(x), "dynamic": lambda: dynamic(x), "gemvs": run_gemvs}
    for i, ((layer, xl), (pi, w)) in enumerate(zip(layers, gemvs)):
        plain = layer.weight_dynamic.detach()[0].clone()
        fns[f"conv{i}"] = lambda layer=layer, xl=xl, plain=plain: F.conv2d(
            xl, plain, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        fns[f"gemv{i}"] = lambda pi=pi, w=w: torch.mm(pi, w)
        fns[f"layer{i}"] = lambda layer=layer, xl=xl: layer(xl)
    with torch.no_grad():
        timings = latency.time_interleaved(fns, repeats=args.repeats, warmup=2)
        mix_in_model, profiled_total = profiled_mix_ms(dynamic, x, args.profiled)
    s = timings["static"].median * 1e3
    d = timings["dynamic"].median * 1e3
    g = timings["gemvs"].median * 1e3
    rows = [
        {"part": "static model, batch-1 forward", "ms": s, "ratio": 1.0},
        {"part": "fully dynamic model, batch-1 forward", "ms": d, "ratio": d / s},
        {"part": "mixing GEMVs inside the dynamic forward (profiler self time)", "ms": mix_in_model,
         "ratio": mix_in_model / s},
        {"part": "the same GEMVs alone, back to back", "ms": g, "ratio": g / s, "gb_per_s": nbytes / (g / 1e3) / 1e9,
         "mib_streamed": nbytes / 2**20},
        {"part": "floor: static forward + GEMVs alone", "ms": s + g, "ratio": (s + g) / s},
        {"part": "rest: dynamic - static - mixing inside", "ms": d - s - mix_in_model,
         "ratio": (d - s - mix_in_model) / s},
    ]
    per = [(layer_label(layer, xl), *(timings[f"{kind}{i}"].median * 1e3 for kind in ("conv", "gemv", "layer")))
           for i, (layer, xl) in enumerate(layers)]
    convs = sum(c for _, c, _, _ in per)
    overlap = s - convs + sum(max(c, g) for _, c, g, _ in per)
    rows += [
        {"part": "per layer: the plain convs alone, summed", "ms": convs, "ratio": convs / s},
        {"part": "per layer: the dynamic layers alone, summed", "ms": sum(dl for *_, dl in per),
         "ratio": sum(dl for *_, dl in per) / s},
        {"part": "floor with overlap: static - convs + sum of max(conv, GEMV)", "ms": overlap, "ratio": overlap / s},
    ]
    for label in dict.fromkeys(lab for lab, *_ in per):
        conv_l, gemv_l, dyn_l = (sum(v[j] for v in per if v[0] == label) for j in (1, 2, 3))
        rows.append({"part": f"layers {label}: dynamic - max(conv, GEMV)", "ms": dyn_l - max(conv_l, gemv_l),
                     "ratio": (dyn_l - max(conv_l, gemv_l)) / s, "conv_ms": conv_l, "gemv_ms": gemv_l,
                     "dynamic_ms": dyn_l})
    log(f"static {s:.1f} ms, dynamic {d:.1f} ms ({d / s:.2f}x); mixing in the model {mix_in_model:.1f} ms "
        f"(profiled forward {profiled_total:.1f} ms); GEMVs alone {g:.1f} ms = {nbytes / (g / 1e3) / 1e9:.1f} GB/s "
        f"over {nbytes / 2**20:.0f} MiB; floor {(s + g) / s:.2f}x, with overlap {overlap / s:.2f}x")
    write("b1_floor", args, {"machine": info, "bytes_streamed": nbytes, "gemvs": len(gemvs), "rows": rows})


if __name__ == "__main__":
    main()
