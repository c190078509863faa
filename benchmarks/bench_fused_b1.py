"""The fused kernel at batch 1 with the weights cold in cache: the factors' row layout against the packed one.

    python benchmarks/bench_fused_b1.py [--threads 2] [--repeats 40]

At batch 1 a deep dynamic layer is bound by reading its K kernels (in a model they come from main memory:
ResNet-18's 19 dynamic convs hold 170 MiB of them). Each candidate cycles through 8 copies of its weights, so every
call reads them cold (8 x 4 x 9.4 MiB at 512@4 exceeds a 32 MiB L3), as in a model's forward. Every figure
is time / the static conv on cold weights (``F.conv2d``, one of 8 weight copies per call), interleaved in one
process, on the ResNet-18 3x3 shapes with K = 4:

- ``mm``: the static conv's GEMM alone (MKL, ``weight [O, C*9] @ cols``), cold weights;
- ``mix``: the K kernels mixed into one (``mix_factors``): the stream alone, no conv;
- ``fused_rows``: ``fused_dynamic_conv`` on the factors' row layout ``[K, O, C*9]`` with the batch-1 rule's
  tiles (``padnet.ops.fused.fused_tiles``);
- ``fused_packed``: the same on the factors packed for those tiles (``pack_fused_factors``), as the layers'
  compiled batch-1 call runs it.

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
COPIES = 8  # weight copies per candidate, used in turn: each call reads its weights cold


def main() -> None:
    p = base_parser(__doc__)
    p.set_defaults(repeats=40)
    args = p.parse_args()
    info = setup(args)
    lib = fused.load_fused()
    if lib is None:
        raise SystemExit("the fused kernel is unavailable (no compiler?)")
    rows = []
    with torch.no_grad():
        for c, hw in [(128, 16), (256, 8), (512, 4)]:
            torch.manual_seed(0)
            k = 4
            x = torch.randn(1, c, hw, hw)
            pi = torch.softmax(torch.randn(1, k), -1)
            dyns = [torch.randn(k, c, c * 9) * 0.01 for _ in range(COPIES)]
            statics = [torch.randn(c, c, 3, 3) * 0.01 for _ in range(COPIES)]
            tiles = fused.fused_tiles(c, c * 9, hw * hw, 1, 4)
            packs = [lib.pack_fused_factors(d, tiles[0], tiles[2]) for d in dyns]
            cols = im2col_workspace(x, GEOM).clone()
            if not torch.equal(lib.fused_dynamic_conv(cols, pi, dyns[0], None, *tiles),
                               lib.fused_dynamic_conv_packed(cols, pi, packs[0], k, c, None, *tiles)):
                raise SystemExit("packed and row layouts disagree")
            mixed, y = torch.empty(1, c * c * 9), torch.empty(c, hw * hw)
            turn = {"i": 0}

            def nxt() -> int:
                turn["i"] = (turn["i"] + 1) % COPIES
                return turn["i"]

            fns = {
                "static": lambda: F.conv2d(x, statics[nxt()], None, 1, 1),
                "mm": lambda: torch.mm(statics[nxt()].view(c, -1), cols[0], out=y),
                "mix": lambda: lib.mix_factors(pi, dyns[nxt()].view(k, -1), None, None, 0.0, 0.0, mixed),
                "fused_rows": lambda: lib.fused_dynamic_conv(cols, pi, dyns[nxt()], None, *tiles),
                "fused_packed": lambda: lib.fused_dynamic_conv_packed(cols, pi, packs[nxt()], k, c, None, *tiles),
            }
            t_ = time_interleaved(fns, repeats=args.repeats, min_round_s=0.02)
            base = t_["static"].median
            row = {"part": "batch 1, weights cold", "shape": f"{c}@{hw}", "tiles": str(tiles),
                   "static_ms": base * 1e3}
            row.update({n: v.median / base for n, v in t_.items() if n != "static"})
            row["packed / rows"] = t_["fused_packed"].median / t_["fused_rows"].median
            rows.append(row)
            log(str(row))
    write("fused_b1", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
