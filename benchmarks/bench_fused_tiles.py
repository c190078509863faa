"""The measurements behind the fused kernel's tile rule and the padded static rows (inference, batch 32).

    python benchmarks/bench_fused_tiles.py [--threads 2] [--repeats 9]

Every figure is time / static conv of the full layer shape (interleaved, same process):

- ``tiles``: ``fused_dynamic_conv2d`` with explicit ``(rows, samples, chunk)`` work items against the rule's
  (``padnet.ops.fused.fused_tiles``), on the ResNet-18 3x3 shapes (fully dynamic) and on the 30 % dynamic part
  of a channel split (77 of 256 and 154 of 512 rows), where unequal tiles (64 + 13 rows) leave a thread idle;
- ``conv_rows``: a plain conv with fewer output channels (the static part of a channel split), unpadded and
  padded to a multiple of 32 (``padnet.ops.aligned_static_rows``);
- ``im2col``: the C++ im2col against the strided aten copy (``PADNET_FUSED`` on / off), as ms.

Builds the kernel if it is not cached yet (about a minute; PADNET_FUSED=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("PADNET_FUSED", "1")

from _common import base_parser, log, setup, write  # noqa: E402,I001  (sets OMP_WAIT_POLICY before torch loads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from latency import time_interleaved  # noqa: E402
from padnet.ops import fused  # noqa: E402
from padnet.ops.geometry import ConvGeometry  # noqa: E402
from padnet.ops.im2col import im2col_workspace  # noqa: E402

GEOM = ConvGeometry((3, 3), 1, 1, 1, 1)
TILES = [(16, 32, 256), (32, 32, 128), (64, 8, 128), (80, 8, 128), (128, 8, 128), (64, 8, 64)]


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    info = setup(args)
    if fused.load_fused() is None:
        raise SystemExit("the fused kernel is unavailable (no compiler?)")
    b, rows = args.batch, []
    with torch.no_grad():
        for c, hw, out in [(512, 4, 512), (256, 8, 256), (128, 16, 128), (256, 8, 77), (512, 4, 154)]:
            torch.manual_seed(0)
            x = torch.randn(b, c, hw, hw)
            pi = torch.softmax(torch.randn(b, 4), -1)
            dyn = torch.randn(4, out, c, 3, 3) * 0.01
            w = torch.randn(c, c, 3, 3) * 0.01
            rule = fused.fused_tiles(out, c * 9, hw * hw, b, 4)
            fns = {"static": lambda x=x, w=w: F.conv2d(x, w, None, 1, 1),
                   "rule": lambda x=x, pi=pi, dyn=dyn: fused.fused_dynamic_conv2d(x, pi, dyn, None, GEOM, 1)}
            for t in TILES:
                if t[0] <= out:
                    fns[str(t)] = lambda x=x, pi=pi, dyn=dyn, t=t: fused.fused_dynamic_conv2d(x, pi, dyn, None, GEOM,
                                                                                              1, tiles=t)
            t_ = time_interleaved(fns, repeats=args.repeats, min_round_s=0.02)
            base = t_["static"].median
            row = {"part": "tiles", "shape": f"{c}@{hw}", "rows": out, "rule": str(rule)}
            row.update({n: v.median / base for n, v in t_.items() if n != "static"})
            rows.append(row)
            log(str(row))
        for c, hw, counts in [(512, 4, [358, 384, 352, 368]), (256, 8, [179, 192, 176]), (128, 16, [90, 96])]:
            x = torch.randn(b, c, hw, hw)
            ws = {o: torch.randn(o, c, 3, 3) for o in [c, *counts]}
            t_ = time_interleaved({str(o): (lambda x=x, w=w: F.conv2d(x, w, None, 1, 1)) for o, w in ws.items()},
                                  repeats=args.repeats, min_round_s=0.02)
            base = t_[str(c)].median
            row = {"part": "conv_rows", "shape": f"{c}@{hw}"}
            row.update({f"{o} rows": t_[str(o)].median / base for o in counts})
            rows.append(row)
            log(str(row))

        def unfold(x, mode):
            os.environ["PADNET_FUSED"] = mode
            try:
                im2col_workspace(x, GEOM)
            finally:
                os.environ["PADNET_FUSED"] = "1"

        for c, hw in [(512, 4), (256, 8), (128, 16), (64, 32)]:
            x = torch.randn(b, c, hw, hw)
            t_ = time_interleaved({"cpp": lambda x=x: unfold(x, "1"), "aten": lambda x=x: unfold(x, "0")},
                                  repeats=args.repeats, min_round_s=0.02)
            row = {"part": "im2col", "shape": f"{c}@{hw}", "cpp_ms": t_["cpp"].median * 1e3,
                   "aten_ms": t_["aten"].median * 1e3}
            rows.append(row)
            log(str(row))
    write("fused_tiles", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
