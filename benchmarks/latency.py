"""Latency, throughput and peak-memory measurement, and the benchmark suites.

Timing discipline (shared CPUs are noisy): every figure is a ratio against a
baseline measured *in the same run*; candidates and baseline are interleaved
(round-robin, one call each per round) and the median over rounds is used.
The machine load (``os.getloadavg``) is recorded before and after each suite.

Peak memory: the growth of the process's peak resident set while running the
measured call once, via ``/proc/self/clear_refs`` (writing ``5`` resets
``VmHWM``) then ``VmHWM - VmRSS`` (Linux). Where that is unavailable it falls
back to the ``ru_maxrss`` delta, which only sees new all-time peaks. Both see
every allocation (PyTorch's CPU allocator included), unlike ``tracemalloc``.

Suites (used by ``benchmarks/`` and ``padnet bench``):

- :func:`conv_layer_suite`: ResNet-18 3x3 shapes, static vs the naive
  per-sample grouped conv vs padnet's DynamicConv2d / deploy forms.
- :func:`moe_suite`: MoE top-k vs a dense FFN with the same active parameters.
- :func:`model_suite`: ResNet-18 (small input) static / dynamic / PAD / compact.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Timing",
    "machine_info",
    "time_interleaved",
    "peak_memory_delta",
    "conv_layer_suite",
    "moe_suite",
    "model_suite",
    "build_model_variant",
    "peak_memory_fresh_process",
    "naive_moe_dispatch",
    "grouped_mm_moe_dispatch",
    "format_rows",
    "geomean",
]


# --------------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call seconds of one candidate: median and quartiles over the rounds.

    ``cpu_median``: median process CPU seconds (user + system, all threads) per
    call. On an oversubscribed machine wall time includes waiting for a
    descheduled worker thread at every parallel region; CPU time counts only the
    work (with ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep instead of
    spinning), so it is the steadier proxy for relative cost there.
    """

    median: float
    q1: float
    q3: float
    samples: list[float] = field(default_factory=list, repr=False)
    cpu_median: float = float("nan")


def machine_info() -> dict:
    """Load averages, CPU count, torch threads and versions (stated next to every result)."""
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (float("nan"),) * 3
    from padnet.ops.autotune import autotune_enabled, cpu_model

    return {
        "cpu_model": cpu_model(),
        "autotune": autotune_enabled(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)"),
        "load_1m": round(load[0], 2),
        "load_5m": round(load[1], 2),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1, min_round_s: float = 0.0,
    rotate: bool = False,
) -> dict[str, Timing]:
    """Median per-call time of each callable, measured round-robin.

    Each round calls every candidate once (or several times until
    ``min_round_s`` has passed, for very fast calls), so slow drifts of the
    machine load hit all candidates alike. ``rotate``: round ``r`` starts at
    candidate ``r mod n``, so that no candidate always runs right after the
    same one (a candidate with large temporaries evicts the caches of the next:
    with a 32 MiB L3 the call after the output-space backend measured up to
    10 % slower than the same backend after the static conv).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    inner = {name: 1 for name in fns}
    if min_round_s > 0:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = max(time.perf_counter() - t0, 1e-7)
            inner[name] = max(1, int(math.ceil(min_round_s / dt)))
    names = list(fns)
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            n = inner[name]
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((_cpu_seconds() - c0) / n)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = Timing(statistics.median(s), q[0], q[2], s, statistics.median(cpu[name]))
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory_delta(fn: Callable[[], object]) -> tuple[int, str]:
    """``(bytes, method)``: growth of peak resident memory while ``fn()`` runs once."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _read_status("VmRSS")
        fn()
        peak = _read_status("VmHWM")
        if base is not None and peak is not None:
            return max(0, peak - base), "VmHWM-reset"
    except OSError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, after - before), "ru_maxrss-delta"


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def format_rows(rows: list[dict], columns: list[str] | None = None) -> str:
    """Markdown table of result rows."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers to build benchmark subjects
# --------------------------------------------------------------------------------------------


def random_element_mask_(layer, ratio: float, generator: torch.Generator) -> None:
    """Every mode group: each entry dynamic with probability ``ratio``."""
    for g in layer.mode_groups():
        layer.set_mode_mask(g.name, (torch.rand(g.shape, generator=generator) < ratio).float())


def random_channel_mask_(layer, ratio: float, generator: torch.Generator) -> None:
    """Every mode group: ``round(ratio * O)`` whole output channels dynamic, the rest static."""
    for g in layer.mode_groups():
        rows = g.shape[0]
        n = max(1, int(round(ratio * rows)))
        chosen = torch.randperm(rows, generator=generator)[:n]
        row_mask = torch.zeros(rows)
        row_mask[chosen] = 1.0
        layer.set_mode_mask(g.name, row_mask.view(-1, *([1] * (len(g.shape) - 1))).expand(g.shape).clone())


def _fwd(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: nn.Module, x: Tensor) -> Callable[[], object]:
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    gy = None

    def run():
        nonlocal gy
        for p in params:
            p.grad = None
        xg.grad = None
        y = module(xg)
        if gy is None:
            gy = torch.randn_like(y)
        y.backward(gy)

    return run


# --------------------------------------------------------------------------------------------
# conv layer suite
# --------------------------------------------------------------------------------------------

RESNET18_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))


class CondConvBaseline(nn.Module):
    """The plain per-sample-kernel dynamic conv (CondConv / DY-Conv algorithm), no PAD machinery.

    Routing MLP -> softmax -> ``pi @ W`` (B kernels) -> one grouped conv with
    ``groups = B``. Shares the routing network and kernels of a padnet layer, so
    both compute the same function; the peer baseline for padnet's fully dynamic layer.
    """

    def __init__(self, layer) -> None:
        super().__init__()
        self.attention = layer.attention
        self.weight = layer.weight_dynamic
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pi = torch.softmax(self.attention(x), dim=-1)
        kernels = (pi @ self.weight.flatten(1)).view(b * self.weight.shape[1], *self.weight.shape[2:])
        y = F.conv2d(x.reshape(1, b * c, h, w), kernels, None, self.stride, self.padding, self.dilation, b)
        return y.view(b, -1, *y.shape[-2:])


def conv_layer_variants(channels: int, num_kernels: int = 4, ratio: float = 0.3, seed: int = 0,
                        include: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Static conv, naive grouped-conv dynamic layer, padnet layers and deploy forms for one 3x3 shape."""
    from padnet.layers import CompactDynamicConv2d, DynamicConv2d

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    static = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    out: dict[str, nn.Module] = {"static": static}
    base = DynamicConv2d.from_conv(static, num_kernels=num_kernels)
    naive = copy.deepcopy(base)
    naive.backend = "weight"
    out["naive_grouped"] = naive
    out["condconv"] = CondConvBaseline(base)
    out["dynamic"] = base
    for name in ("weight", "bmm", "output"):
        layer = copy.deepcopy(base)
        layer.backend = name
        out[f"dynamic_{name}"] = layer
    elem = copy.deepcopy(base)
    random_element_mask_(elem, ratio, gen)
    out["pad_element"] = elem
    out["compact_element"] = CompactDynamicConv2d(elem)
    chan = copy.deepcopy(base)
    random_channel_mask_(chan, ratio, gen)
    out["pad_channel"] = chan
    out["compact_channel"] = CompactDynamicConv2d(chan)
    if include is not None:
        keep = set(include) | {"static"}
        out = {k: v for k, v in out.items() if k in keep}
    return out


def conv_layer_suite(
    shapes=RESNET18_SHAPES,
    batches=(1, 32),
    modes=("fwd", "fwd+bwd"),
    num_kernels: int = 4,
    ratio: float = 0.3,
    repeats: int = 7,
    include: Iterable[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows ``{shape, batch, mode, variant, ms, ratio}``; ``ratio`` is time / static conv (same run)."""
    rows = []
    for channels, size in shapes:
        variants = conv_layer_variants(channels, num_kernels, ratio, include=include)
        for batch in batches:
            x = torch.randn(batch, channels, size, size)
            for mode in modes:
                if mode == "fwd":
                    for m in variants.values():
                        m.eval()
                    fns = {name: _fwd(m, x) for name, m in variants.items()}
                else:
                    for m in variants.values():
                        m.train()
                    fns = {name: _fwd_bwd(m, x) for name, m in variants.items()}
                load = os.getloadavg()[0]
                timings = time_interleaved(fns, repeats=repeats, warmup=1, min_round_s=0.02)
                base = timings["static"].median
                for name, t in timings.items():
                    rows.append({
                        "shape": f"{channels}@{size}x{size}", "batch": batch, "mode": mode, "variant": name,
                        "ms": t.median * 1e3, "ratio": t.median / base,
                        "cpu_ratio": t.cpu_median / timings["static"].cpu_median, "load": round(load, 2),
                    })
                if log:
                    summary = ", ".join(f"{n}={t.median / base:.2f}x" for n, t in timings.items() if n != "static")
                    log(f"{channels}@{size}x{size} B={batch} {mode}: static {base * 1e3:.2f} ms; {summary}")
    return rows


# --------------------------------------------------------------------------------------------
# MoE suite
# --------------------------------------------------------------------------------------------


def naive_moe_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation) -> Tensor:
    """The original padnet sorted dispatch (loop over experts, cat, index_add): the peer baseline."""
    n, h = x.shape
    num_experts = w_in.shape[0]
    k = topk_idx.shape[1]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(n, w_out.shape[1], device=x.device, dtype=acc_dtype)
    flat_expert = topk_idx.reshape(-1)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    order = torch.argsort(flat_expert, stable=True)
    token_idx = torch.div(order, k, rounding_mode="floor")
    gates = topk_gates.reshape(-1)[order]
    x_sorted = x.index_select(0, token_idx)
    pieces = []
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        xe = x_sorted[start : start + c]
        hidden = activation(F.linear(xe, w_in[e], None if b_in is None else b_in[e]))
        pieces.append(F.linear(hidden, w_out[e], None if b_out is None else b_out[e]))
        start += c
    y = torch.cat(pieces, dim=0) * gates.unsqueeze(1)
    out = out.index_add(0, token_idx, y.to(acc_dtype))
    return out.to(x.dtype)


def grouped_mm_moe_dispatch(x, topk_idx, topk_gates, w_in, b_in, w_out, b_out, activation) -> Tensor:
    """Sorted dispatch with ``torch._grouped_mm`` (CPU: float32/bfloat16 only) -- measured, not used by default."""
    n, h = x.shape
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w_in.shape[0]), 0).to(torch.int32)
    x_sorted = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    experts = flat[order]
    hidden = torch._grouped_mm(x_sorted, w_in.transpose(1, 2), offs=offs)
    if b_in is not None:
        hidden = hidden + b_in.index_select(0, experts)
    y = torch._grouped_mm(activation(hidden), w_out.transpose(1, 2), offs=offs)
    if b_out is not None:
        y = y + b_out.index_select(0, experts)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    y = y.index_select(0, inverse).view(n, k, -1)
    return torch.bmm(topk_gates.unsqueeze(1).to(y.dtype), y).squeeze(1)


class _EffectiveWeights(nn.Module):
    """``MoEFeedForward.effective_weights()`` alone: the per-call mask/scale combination of the training form."""

    def __init__(self, moe) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe.effective_weights()[0]


class _DispatchOnly(nn.Module):
    """Routing + a dispatch function on fixed effective weights (isolates the dispatch cost)."""

    def __init__(self, moe, dispatch) -> None:
        super().__init__()
        self.moe = moe
        self.dispatch = dispatch
        with torch.no_grad():
            self.weights = [None if w is None else w.detach().clone() for w in moe.effective_weights()]

    def forward(self, x):
        from padnet.layers.moe import route_tokens

        logits = self.moe.router(x)
        idx, gates, _ = route_tokens(logits, self.moe.top_k, self.moe.normalize_gates)
        return self.dispatch(x, idx, gates, *self.weights, self.moe.act)


def moe_suite(
    tokens=(512, 4096),
    hidden: int = 384,
    intermediate: int = 1536,
    num_experts: int = 4,
    top_k: int = 2,
    modes=("fwd", "fwd+bwd"),
    repeats: int = 7,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """MoE layer forms vs a dense FFN of intermediate size ``top_k * I`` (same active parameters per token)."""
    from padnet.layers import CompactMoEFeedForward, MoEFeedForward
    from padnet.layers.moe import moe_dispatch

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(hidden, top_k * intermediate), nn.GELU(), nn.Linear(top_k * intermediate, hidden))
    moe = MoEFeedForward(hidden, intermediate, num_experts=num_experts, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.02)
    variants = {
        "dense_ffn": dense,
        "moe_layer": moe,
        "compact_moe": CompactMoEFeedForward.from_layer(moe).train(moe.training),
        "dispatch_only": _DispatchOnly(moe, moe_dispatch),
        "naive_dispatch_only": _DispatchOnly(moe, naive_moe_dispatch),
        "dense_dispatch_only(export path)": _DispatchOnly(moe, lambda *a: moe_dispatch(*a, impl="dense")),
    }
    if hasattr(torch, "_grouped_mm"):
        variants["grouped_mm_dispatch_only"] = _DispatchOnly(moe, grouped_mm_moe_dispatch)
    variants["effective_weights_only"] = _EffectiveWeights(moe)
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden)
        for mode in modes:
            subjects = variants if mode == "fwd" else {
                k: v for k, v in variants.items() if "dispatch_only" not in k and "only" not in k
            }
            for m in subjects.values():
                m.train(mode != "fwd")
            fns = {name: (_fwd(m, x) if mode == "fwd" else _fwd_bwd(m, x)) for name, m in subjects.items()}
            load = os.getloadavg()[0]
            timings = time_interleaved(fns, repeats=repeats, warmup=1, min_round_s=0.02)
            base = timings["dense_ffn"].median
            for name, t in timings.items():
                rows.append({"tokens": n, "mode": mode, "variant": name, "ms": t.median * 1e3,
                             "ratio": t.median / base, "cpu_ratio": t.cpu_median / timings["dense_ffn"].cpu_median,
                             "load": round(load, 2)})
            if log:
                summary = ", ".join(f"{k}={t.median / base:.2f}x" for k, t in timings.items() if k != "dense_ffn")
                log(f"MoE N={n} {mode}: dense {base * 1e3:.2f} ms; {summary}")
    return rows


# --------------------------------------------------------------------------------------------
# model suite
# --------------------------------------------------------------------------------------------


MODEL_VARIANTS = (
    "static", "naive_grouped", "dynamic", "pad_element", "compact_element", "pad_channel", "compact_channel",
    "compact_channel_foldbn", "compact_dynamic",
)


def build_model_variant(name: str, ratio: float = 0.3, num_kernels: int = 4, num_classes: int = 10,
                        width: float = 1.0) -> nn.Module:
    """One ResNet-18 (small input) variant, deterministic (seeded), in eval mode.

    ``static``; ``naive_grouped`` (every conv but the stem dynamic, grouped-conv
    backend); ``dynamic`` (backend auto); ``pad_element`` / ``pad_channel``
    (random element mask at ``ratio`` / ``ratio`` of each layer's output
    channels); ``compact_*`` their deploy forms; ``compact_channel_foldbn`` with
    BatchNorm folded.
    """
    from padnet.layers import pad_layers
    from padnet.models import create_model
    from padnet.transforms import DynamicConvConfig, PadConfig, compact_, dynamize_

    if name not in MODEL_VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; expected one of {MODEL_VARIANTS}")
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=num_classes, small_input=True, width=width).eval()
    if name == "static":
        return model
    dynamize_(model, PadConfig(conv=DynamicConvConfig(num_kernels=num_kernels,
                                                      backend="weight" if name == "naive_grouped" else "auto"),
                               seed=0))
    if "element" in name:
        gen = torch.Generator().manual_seed(1)
        for _, layer in pad_layers(model):
            random_element_mask_(layer, ratio, gen)
    elif "channel" in name:
        gen = torch.Generator().manual_seed(2)
        for _, layer in pad_layers(model):
            random_channel_mask_(layer, ratio, gen)
    if name.startswith("compact"):
        compact_(model.eval(), fold_bn=name.endswith("foldbn"))
    return model.eval()


def model_variants(ratio: float = 0.3, num_kernels: int = 4, num_classes: int = 10,
                   include: Iterable[str] | None = None, width: float = 1.0) -> dict[str, nn.Module]:
    """``{name: model}`` for :data:`MODEL_VARIANTS` (or ``include`` plus ``static``)."""
    names = MODEL_VARIANTS if include is None else [n for n in MODEL_VARIANTS if n in set(include) | {"static"}]
    return {n: build_model_variant(n, ratio, num_kernels, num_classes, width) for n in names}


_PEAK_CHILD = """
import json, os, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {bench_dir!r})
from latency import build_model_variant, peak_memory_delta
model = build_model_variant({name!r}, {ratio!r}, width={width!r})
x = torch.randn({batch}, 3, {size}, {size})
def run():
    with torch.no_grad():
        model(x)
nbytes, method = peak_memory_delta(run)
print(json.dumps({{"bytes": nbytes, "method": method}}))
"""


def peak_memory_fresh_process(name: str, batch: int = 32, image_size: int = 32, ratio: float = 0.3,
                              width: float = 1.0, threads: int | None = None) -> tuple[int, str]:
    """Peak resident-memory growth of the *first* forward of a variant, in a fresh Python process.

    A fresh process matters: in a long-lived one the allocator keeps freed
    memory resident, so later forwards reuse it and the high-water mark no
    longer moves. Counts activations, per-sample kernels, scratch buffers and
    one-time oneDNN kernels, not the weights (built before the measurement).
    """
    import json
    import subprocess
    import sys

    code = _PEAK_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads or torch.get_num_threads(), name=name, ratio=ratio, width=width,
                              batch=batch, size=image_size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return int(result["bytes"]), result["method"] + " (fresh process, first forward)"


def model_suite(
    batch: int = 32,
    image_size: int = 32,
    ratio: float = 0.3,
    repeats: int = 5,
    train_step: bool = True,
    memory: bool = True,
    include: Iterable[str] | None = None,
    log: Callable[[str], None] | None = None,
    width: float = 1.0,
) -> list[dict]:
    """Rows per variant: images/s at ``batch``, batch-1 latency, optional train step, peak memory (forward)."""
    variants = model_variants(ratio, include=include, width=width)
    rows = {name: {"variant": name} for name in variants}
    x = torch.randn(batch, 3, image_size, image_size)
    x1 = x[:1].clone()
    for m in variants.values():
        m.eval()
    measures = [("fwd_b%d" % batch, x, _fwd), ("latency_b1", x1, _fwd)]
    if train_step:
        measures.append(("train_step_b%d" % batch, x, _fwd_bwd))
    for label, inp, maker in measures:
        for m in variants.values():
            m.train(maker is _fwd_bwd)
        fns = {name: maker(m, inp) for name, m in variants.items()}
        load = os.getloadavg()[0]
        timings = time_interleaved(fns, repeats=repeats, warmup=1)
        base = timings["static"].median
        for name, t in timings.items():
            rows[name][f"{label}_ms"] = t.median * 1e3
            rows[name][f"{label}_ratio"] = t.median / base
            rows[name][f"{label}_cpu_ratio"] = t.cpu_median / timings["static"].cpu_median
            rows[name][f"{label}_load"] = round(load, 2)
            if label.startswith("fwd_b"):
                rows[name]["images_per_s"] = inp.shape[0] / t.median
        if log:
            log(f"{label}: static {base * 1e3:.1f} ms; "
                + ", ".join(f"{n}={t.median / base:.2f}x" for n, t in timings.items() if n != "static"))
    if memory:
        for name in variants:
            nbytes, method = peak_memory_fresh_process(name, batch, image_size, ratio, width)
            rows[name]["peak_mem_fwd_MiB"] = nbytes / 2**20
            rows[name]["mem_method"] = method
    for name, m in variants.items():
        rows[name]["params_M"] = sum(p.numel() for p in m.parameters()) / 1e6
    return list(rows.values())


def asdict_timing(t: Timing) -> dict:
    return asdict(t)
