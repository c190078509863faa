"""Micro-measurements behind the explanations in docs/benchmarks.md (each a ratio to a static conv).

    python benchmarks/bench_micro.py

1. ``channels``: a static 3x3 conv with 70% / 30% of the output channels, ragged
   (e.g. 90 of 128) vs padded to a multiple of 16 -- why the channel split pads.
2. ``alloc``: im2col into a fresh tensor vs into a reused buffer -- fresh
   buffers above glibc's mmap threshold are page-faulted in on every call.
3. ``gemm``: the same conv as oneDNN conv vs im2col + MKL GEMM (``torch.matmul``)
   -- the GEMM path weight space must use starts behind on this CPU.
4. ``stream``: writing the B per-sample kernels alone (``pi @ W`` into a reused
   buffer) -- the memory traffic every weight-space method pays.
"""

from __future__ import annotations

from _common import base_parser, log, setup, write  # noqa: I001  (sets OMP_WAIT_POLICY before torch loads)

import torch
import torch.nn.functional as F

from latency import RESNET18_SHAPES, format_rows, time_interleaved
from padnet import ops as cf
from padnet.ops.im2col import im2col_workspace



def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    info = setup(args)
    rows = []
    b, k = args.batch, 4
    for c, hw in RESNET18_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(b, c, hw, hw)
        w = torch.randn(c, c, 3, 3)
        geom = cf.ConvGeometry((3, 3), 1, 1, 1, 1)
        cols = cf.im2col(x, geom)[0].contiguous()
        n70, n30 = round(0.7 * c), c - round(0.7 * c)
        pad70, pad30 = n70 + (-n70 % 16), n30 + (-n30 % 16)
        dyn = torch.randn(k, c * c * 9)
        pi = torch.softmax(torch.randn(b, k), -1)
        kbuf = torch.empty(b, c * c * 9)
        fns = {
            "static": lambda: F.conv2d(x, w, padding=1),
            f"conv_{n70}_of_{c}": lambda: F.conv2d(x, w[:n70], padding=1),
            f"conv_{pad70}_padded": lambda: F.conv2d(x, torch.cat([w[:n70], w.new_zeros(pad70 - n70, c, 3, 3)]),
                                                    padding=1),
            f"conv_{n30}_of_{c}": lambda: F.conv2d(x, w[:n30], padding=1),
            f"conv_{pad30}_padded": lambda: F.conv2d(x, torch.cat([w[:n30], w.new_zeros(pad30 - n30, c, 3, 3)]),
                                                    padding=1),
            "im2col_fresh": lambda: cf.im2col(x, geom)[0].contiguous(),
            "im2col_reused_buffer": lambda: im2col_workspace(x, geom),
            "gemm_im2col_matmul": lambda: torch.matmul(w.view(c, -1), cols),
            "stream_B_kernels": lambda: torch.mm(pi, dyn, out=kbuf),
        }
        with torch.no_grad():
            t = time_interleaved(fns, repeats=args.repeats, min_round_s=0.02)
        base = t["static"].median
        row = {"shape": f"{c}@{hw}", "batch": b, "static_ms": base * 1e3}
        row.update({name: v.median / base for name, v in t.items() if name != "static"})
        row["kernel_stream_MiB"] = b * c * c * 9 * 4 / 2**20
        row["im2col_MiB"] = cols.numel() * 4 / 2**20
        rows.append(row)
        log(str(row))
    for r in rows:
        print(format_rows([r]))
        print()
    write("micro", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
