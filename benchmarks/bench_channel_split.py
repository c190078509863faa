"""Where the time of a compact channel-split PAD conv goes (kappa=0.3, ResNet-18 3x3 shapes).

    python benchmarks/bench_channel_split.py [--batch 32]

For each shape, the deployed layer (``CompactDynamicConv2d`` of a layer with
30% of its output channels dynamic) is timed next to its parts, each run alone
on the same input, all as ratios to the static conv of the full shape:
``routing`` (pool + MLP + softmax), ``static_part`` (plain conv with the 70%
static output channels, padded with zero rows to a multiple of 32 where the
layer does: ``padnet.ops.aligned_static_rows``), ``dynamic_part`` (the dynamic conv over the 30%
dynamic channels, backend as ``auto`` picks it, padded as the layer pads it),
``merge`` (both outputs interleaved into channel order, as the layer does it:
``padnet.ops.merge_split_outputs``), and for comparison ``merge_two_pass``
(``cat`` then ``index_select``, the merge before the eighth session) and the
same two for channels_last outputs (``merge_cl``; ``merge_cl_two_pass`` also
converts back to channels_last, as the layer had to).
Where ``auto`` would run the dynamic part as a grouped conv (many output pixels
per sample), the layer skips the split and runs one dynamic conv over all
channels (``path = dense``); the parts then still time the split it avoids
(their sum = what the split would cost).
"""

from __future__ import annotations

from _common import base_parser, log, setup, write  # noqa: I001  (sets OMP_WAIT_POLICY before torch loads)

import torch
import torch.nn.functional as F

from latency import RESNET18_SHAPES, conv_layer_variants, format_rows, time_interleaved
from padnet import ops as cf



def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    info = setup(args)
    rows = []
    for c, hw in RESNET18_SHAPES:
        layers = conv_layer_variants(c, include=["compact_channel"])
        static, compact = layers["static"].eval(), layers["compact_channel"].eval()
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, hw, hw)
        st = compact.mask_structure()
        k, n_dyn = compact.weight.num_factors, st.dynamic_index.numel()
        shape = compact._kernel_shape()
        dyn_rows = compact.weight.dynamic_values.view(k, n_dyn, *shape[1:])
        sta_rows = compact.weight.static_values.view(shape[0] - n_dyn, *shape[1:])
        sta_rows, order = cf.aligned_static_rows(sta_rows, st.order)  # padded as the deployed layer runs them
        with torch.no_grad():
            pi = compact.routing_weights(x)
            backend = cf.resolve_backend(x, pi, dyn_rows, None, 1, 1, 1, 1, "auto")
            ys = F.conv2d(x, sta_rows, padding=1)
            yd = cf.dynamic_conv2d(x, pi, dyn_rows, None, padding=1, backend="auto")  # runs `backend`
            ys_cl, yd_cl = (t.contiguous(memory_format=torch.channels_last) for t in (ys, yd))
        path = "dense" if cf.channel_split_runs_dense(x, pi, dyn_rows, 1, 1, 1, 1) else "split"
        fns = {
            "static": lambda: static(x),
            "compact_channel": lambda: compact(x),
            "routing": lambda: compact.routing_weights(x),
            "static_part": lambda: F.conv2d(x, sta_rows, padding=1),
            "dynamic_part": lambda: cf.dynamic_conv2d(x, pi, dyn_rows, None, padding=1, backend="auto"),
            "merge": lambda: cf.merge_split_outputs(ys, yd, order),
            "merge_two_pass": lambda: torch.cat([ys, yd], dim=1).index_select(1, order),
            "merge_cl": lambda: cf.merge_split_outputs(ys_cl, yd_cl, order),
            "merge_cl_two_pass": lambda: torch.cat([ys_cl, yd_cl], dim=1).index_select(1, order).contiguous(
                memory_format=torch.channels_last),
        }
        with torch.no_grad():
            t = time_interleaved(fns, repeats=args.repeats, min_round_s=0.02)
        base = t["static"].median
        row = {"shape": f"{c}@{hw}", "batch": args.batch, "static_ms": base * 1e3, "path": path,
               "dynamic_backend": backend, "dynamic_channels": n_dyn, "static_rows_run": sta_rows.shape[0]}
        row.update({name: v.median / base for name, v in t.items() if name != "static"})
        row["sum_of_parts"] = sum(row[n] for n in ("routing", "static_part", "dynamic_part", "merge"))
        rows.append(row)
        log(str(row))
    print(format_rows(rows))
    write("channel_split", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
