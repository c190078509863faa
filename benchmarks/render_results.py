"""Render benchmarks/results/*.json as the markdown tables of docs/benchmarks.md.

    python benchmarks/render_results.py > /tmp/tables.md
    python benchmarks/render_results.py --prefix zen3_ > /tmp/zen3.md   # results saved as zen3_<name>
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    """``<name>.fresh.json`` (medians over fresh processes, benchmarks/fresh.py) if present, else ``<name>.json``."""
    fresh = RESULTS / f"{name}.fresh.json"
    if fresh.is_file():
        payload = json.loads(fresh.read_text())
        machines = [m for m in payload["machines"] if m]
        after = [m for m in payload.get("machines_after", []) if m]
        payload["machine"] = dict(machines[0], load_1m=max(m["load_1m"] for m in machines))
        payload["machine_after"] = dict(after[-1], load_1m=max(m["load_1m"] for m in after)) if after else {}
        return payload
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def fmt(v, digits=2):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def machine_line(payload):
    m, a = payload["machine"], payload.get("machine_after", {})
    runs = f"median of {payload['runs']} fresh processes, " if isinstance(payload.get("runs"), int) else ""
    omp = f"; OMP_WAIT_POLICY {m['omp_wait_policy']}" if "omp_wait_policy" in m else ""
    return (f"_{runs}CPU {m.get('cpu_model', 'not recorded')}; load (1-min avg, max) {m['load_1m']} before, "
            f"{a.get('load_1m', '?')} after; {m['torch_threads']} threads, torch {m['torch']}{omp}_")


def backends_table(payload, grad=False):
    rows = payload["rows"]
    cols = ["weight", "bmm", "output"] + ([] if grad else ["aggregate_only"])
    tuned = any("auto" in r for r in rows)
    extra = " auto (tuned) | tuner picked (per process) | auto / fastest |" if tuned else ""
    out = [machine_line(payload), "",
           "| shape | batch | static ms | " + " | ".join(cols) + " | rule picks |" + extra,
           "|---|---|---|" + "---|" * len(cols) + "---|" + ("---|---|---|" if tuned else "")]
    for r in rows:
        best = min(("weight", "bmm", "output"), key=lambda c: r[c])
        cells = [(f"**{r[c]:.2f}**" if c == best else f"{r[c]:.2f}") for c in cols]
        line = f"| {r['shape']} | {r['batch']} | {r['static_ms']:.1f} | " + " | ".join(cells) + f" | {r['auto_picks']} |"
        if tuned:
            line += f" {r['auto']:.2f} | {r.get('tuned_picks', '?')} | {r.get('auto_over_fastest', float('nan')):.2f} |"
        out.append(line)
    return "\n".join(out)


def variant_table(payload, baseline="static"):
    """Rows ``{shape, batch, mode, variant, ratio}`` as one line per (shape, batch, mode), variants as columns."""
    rows = payload["rows"]
    variants = []
    for r in rows:
        if r["variant"] != baseline and r["variant"] not in variants:
            variants.append(r["variant"])
    out = [machine_line(payload), "",
           f"| shape | batch | mode | {baseline} ms | " + " | ".join(variants) + " |",
           "|---|---|---|---|" + "---|" * len(variants)]
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["mode"]), {})[r["variant"]] = r
    for (shape, batch, mode), by in groups.items():
        cells = [f"{by[v]['ratio']:.2f}" if v in by else "" for v in variants]
        out.append(f"| {shape} | {batch} | {mode} | {by[baseline]['ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def autotune_table(payloads):
    """Autotune check: ``backend="auto"`` against the fastest concrete backend in the same process."""
    out = ["| result | shape | batch | mode | auto / fastest (median over processes) | fastest | tuner picked |",
           "|---|---|---|---|---|---|---|"]
    for name, payload in payloads:
        for r in payload["rows"]:
            if "auto_over_fastest" in r:
                mode = "fwd+bwd" if r.get("grad") else "fwd"
                out.append(f"| {name} | {r['shape']} | {r['batch']} | {mode} | {r['auto_over_fastest']:.2f} | "
                           f"{r.get('fastest', '?')} | {r.get('tuned_picks', '?')} |")
    return "\n".join(out) if len(out) > 2 else None


def layers_tables(payload):
    rows = payload["rows"]
    variants = ["condconv", "naive_grouped", "dynamic", "dynamic_weight", "dynamic_bmm", "dynamic_output",
                "pad_element", "compact_element", "pad_channel", "compact_channel"]
    variants = [v for v in variants if any(r["variant"] == v for r in rows)]
    out = [machine_line(payload)]
    for batch in sorted({r["batch"] for r in rows}, reverse=True):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["batch"] == batch and r["mode"] == mode]
            if not sel:
                continue
            out += ["", f"**batch {batch}, {mode}** (time / static conv; CPU-time ratio in parentheses)", "",
                    "| shape | static ms | " + " | ".join(variants) + " |",
                    "|---|---|" + "---|" * len(variants)]
            shapes = []
            for r in sel:
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
            for shape in shapes:
                by = {r["variant"]: r for r in sel if r["shape"] == shape}
                cells = [f"{by[v]['ratio']:.2f} ({by[v]['cpu_ratio']:.2f})" for v in variants if v in by]
                out.append(f"| {shape} | {by['static']['ms']:.1f} | " + " | ".join(cells) + " |")
            gm = [geomean(r["ratio"] for r in sel if r["variant"] == v) for v in variants]
            gmc = [geomean(r["cpu_ratio"] for r in sel if r["variant"] == v) for v in variants]
            out.append("| **geomean** | | " + " | ".join(f"**{a:.2f}** ({b:.2f})" for a, b in zip(gm, gmc)) + " |")
    return "\n".join(out)


def moe_table(payload):
    rows = payload["rows"]
    out = [machine_line(payload), "", "| tokens | mode | variant | ms | time / dense FFN | CPU-time ratio |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
                   f"{r['cpu_ratio']:.2f} |")
    return "\n".join(out)


def models_table(payload):
    rows = payload["rows"]
    keys = [k for k in rows[0] if k.endswith("_ratio") and not k.endswith("cpu_ratio")]
    out = [machine_line(payload), "",
           "| variant | params (M) | images/s (B=32) | " + " | ".join(k.replace("_ratio", " / static") for k in keys)
           + " | peak fwd memory MiB |",
           "|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['params_M']:.1f} | {r['images_per_s']:.1f} | "
                   + " | ".join(f"{r[k]:.2f} ({r[k.replace('_ratio', '_cpu_ratio')]:.2f})" for k in keys)
                   + f" | {r.get('peak_mem_fwd_MiB', float('nan')):.0f} |")
    if rows and "mem_method" in rows[0]:
        out.append(f"\nmemory: {rows[0]['mem_method']}")
    return "\n".join(out)


def micro_table(payload):
    rows = payload["rows"]
    out = [machine_line(payload), ""]
    for r in rows:
        out.append(f"**{r['shape']}, batch {r['batch']}** (static {r['static_ms']:.1f} ms; "
                   f"per-sample kernels {r['kernel_stream_MiB']:.0f} MiB, im2col {r['im2col_MiB']:.0f} MiB): "
                   + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()
                               if k not in ("shape", "batch", "static_ms", "kernel_stream_MiB", "im2col_MiB")))
        out.append("")
    return "\n".join(out)


def channel_split_table(payload):
    rows = payload["rows"]
    parts = ["compact_channel", "routing", "static_part", "dynamic_part", "merge", "sum_of_parts"]
    parts += [p for p in ("merge_two_pass", "merge_cl", "merge_cl_two_pass") if rows and p in rows[0]]
    out = [machine_line(payload), "",
           "| shape | batch | static ms | path | dynamic-part backend | dynamic channels | " + " | ".join(parts) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(parts)]
    for r in rows:
        out.append(f"| {r['shape']} | {r['batch']} | {r['static_ms']:.1f} | {r['path']} | {r['dynamic_backend']} | "
                   f"{r['dynamic_channels']} | "
                   + " | ".join(f"{r[p]:.3f}" if p.startswith("merge") else f"{r[p]:.2f}" for p in parts) + " |")
    return "\n".join(out)


def element_training_table(payload):
    out = [machine_line(payload), "",
           "| shape | batch | static ms | dynamic / static | element / static | element / dynamic | gap ms | "
           "traffic floor of the gap, ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        out.append(f"| {r['shape']} | {r['batch']} | {r['static_ms']:.1f} | {r['dynamic_over_static']:.2f} | "
                   f"{r['element_over_static']:.2f} | {r['element_over_dynamic']:.2f} | "
                   f"{r.get('gap_ms', float('nan')):.1f} | {r.get('extra_floor_ms', float('nan')):.1f} |")
    return "\n".join(out)


def allocator_table(payload):
    runs = payload["runs"]
    variants = ["dynamic", "compact_element", "compact_channel"]
    out = [machine_line(payload), "",
           "| malloc | shape | static ms | " + " | ".join(f"{v} / static" for v in variants) + " |",
           "|---|---|---|" + "---|" * len(variants)]
    for label, rows in runs.items():
        for r in rows:
            out.append(f"| {label} | {r['shape']} | {r['static_ms']:.1f} | "
                       + " | ".join(f"{r[v]:.2f}" for v in variants) + " |")
    return "\n".join(out)


def b1_floor_table(payload):
    """``bench_b1_floor.py``: the parts of the fully dynamic ResNet-18's batch-1 forward and the mixing floor."""
    spread = any("ratio_min" in r for r in payload["rows"])
    out = [machine_line(payload), "",
           "| part | ms | / static forward | " + ("min..max over processes | " if spread else "") + "GB/s |",
           "|---|---|---|" + ("---|" if spread else "") + "---|"]
    for r in payload["rows"]:
        gb = f"{r['gb_per_s']:.1f}" if isinstance(r.get("gb_per_s"), float) else ""
        mib = f" ({r['mib_streamed']:.0f} MiB)" if isinstance(r.get("mib_streamed"), float) else ""
        rng = f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f} | " if spread and "ratio_min" in r else ("| " if spread else "")
        out.append(f"| {r['part']}{mib} | {r['ms']:.2f} | {r['ratio']:.2f} | {rng}{gb} |")
    return "\n".join(out)


def parts_table(payload):
    """Rows that carry a ``part`` field: one table per part, its columns the union of the rows' keys."""
    out = [machine_line(payload)]
    parts: dict[str, list] = {}
    for r in payload["rows"]:
        parts.setdefault(r["part"], []).append(r)
    for part, rows in parts.items():
        cols = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "part"]
        out += ["", f"**{part}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", default="", help="render the results saved as <prefix><name> (another machine's runs)")
    prefix = parser.parse_args().prefix
    for title, name, render in [
        ("allocator", "allocator", allocator_table),
        ("backends (functional, forward)", "backends", backends_table),
        ("backends (functional, forward, the candidates' order rotated every round: `--rotate`)", "backends_rotated",
         backends_table),
        ("backends (functional, forward+backward)", "backends_grad", lambda p: backends_table(p, grad=True)),
        ("conv layers", "conv_layers", layers_tables),
        ("MoE", "moe", moe_table),
        ("MoE, gated (SwiGLU) experts", "moe_gated", moe_table),
        ("models", "models", models_table),
        ("ResNet-18 batch 1: where the fully dynamic model's time goes (OMP_WAIT_POLICY=PASSIVE, the suites' "
         "setting)", "b1_floor", b1_floor_table),
        ("ResNet-18 batch 1, OpenMP's default wait policy", "b1_floor_omp_default", b1_floor_table),
        ("element-PAD training against fully dynamic, per layer (forward+backward)", "element_training",
         element_training_table),
        ("micro-measurements", "micro", micro_table),
        ("channel split: where the time goes", "channel_split", channel_split_table),
        ("torch.compile", "compile", variant_table),
        ("fused C++ kernel (an autotune candidate where its build is cached)", "fused", variant_table),
        ("fused kernel tiles, static-part rows, im2col", "fused_tiles", parts_table),
        ("fused kernel at batch 1, weights cold: row layout against packed factors", "fused_b1", parts_table),
    ]:
        payload = load(prefix + name)
        if payload is None:
            continue
        print(f"### {title}\n")
        print(render(payload))
        print()
    tuned = [(n, p) for n in ("backends", "backends_rotated", "backends_grad") if (p := load(prefix + n)) is not None]
    table = autotune_table(tuned)
    if table:
        print("### autotune check\n")
        print(table)
        print()


if __name__ == "__main__":
    main()
