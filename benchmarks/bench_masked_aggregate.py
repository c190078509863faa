"""Element-PAD training, grouped-conv path: forming the B per-sample kernels from the masked factors.

    python benchmarks/bench_masked_aggregate.py [--channels 64,128,256] [--batch 32] --threads 1

``padnet``: :class:`padnet.ops.masked_conv.MaskedAggregate` (mask the K + 1
factors, then one GEMM with the static part as its bias). ``mask_after``: the
earlier formulation, kept here as the baseline -- one GEMM, then the mask and
the static part applied to the ``[B, P]`` per-sample kernels (two more passes
over them). Same backward. Forward alone (``*_fwd``, no autograd) and
forward + backward (``*_fwd_bwd``), interleaved in one process; ms, median.
"""

from __future__ import annotations

import torch
from _common import base_parser, log, setup, write

from latency import time_interleaved
from padnet.ops.masked_conv import MaskedAggregate


class MaskAfterAggregate(torch.autograd.Function):
    """Baseline: ``w = pi @ W``, then ``w * (lambda_d M) + lambda_s (1 - M) W_s`` in place."""

    @staticmethod
    def forward(ctx, pi, dynamic, static, mask, lambda_s, lambda_d):
        ctx.save_for_backward(pi, dynamic, static, mask, lambda_s, lambda_d)
        m = mask.to(dynamic.dtype).reshape(-1)
        w = pi.to(dynamic.dtype) @ dynamic.reshape(dynamic.shape[0], -1)
        w.mul_(lambda_d * m).add_(static.reshape(-1) * (lambda_s * (1.0 - m)))
        return w.view(pi.shape[0], *dynamic.shape[1:])

    backward = MaskedAggregate.backward


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--channels", default="64,128,256")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kernels", type=int, default=4)
    args = p.parse_args()
    info = setup(args)
    rows = []
    for c in (int(v) for v in args.channels.split(",")):
        torch.manual_seed(0)
        k = args.kernels
        pi = torch.softmax(torch.randn(args.batch, k), -1).requires_grad_()
        dyn = torch.randn(k, c, c, 3, 3, requires_grad=True)
        sta = torch.randn(c, c, 3, 3, requires_grad=True)
        mask = (torch.rand(c, c, 3, 3) < 0.3).float()
        ls, ld = torch.tensor(0.9, requires_grad=True), torch.tensor(1.1, requires_grad=True)
        gw = torch.randn(args.batch, c, c, 3, 3)
        leaves = [pi, dyn, sta, ls, ld]
        torch.testing.assert_close(MaskAfterAggregate.apply(pi, dyn, sta, mask, ls, ld),
                                   MaskedAggregate.apply(pi, dyn, sta, mask, ls, ld))

        def fwd(fn):
            def run():
                with torch.no_grad():
                    fn.apply(pi, dyn, sta, mask, ls, ld)
            return run

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn.apply(pi, dyn, sta, mask, ls, ld), leaves, gw)

        t = time_interleaved({"padnet_fwd": fwd(MaskedAggregate), "mask_after_fwd": fwd(MaskAfterAggregate),
                              "padnet_fwd_bwd": fwd_bwd(MaskedAggregate),
                              "mask_after_fwd_bwd": fwd_bwd(MaskAfterAggregate)}, repeats=args.repeats, warmup=2)
        row = {"channels": c, "batch": args.batch, **{f"{n}_ms": v.median * 1e3 for n, v in t.items()}}
        row["fwd_ratio"] = row["padnet_fwd_ms"] / row["mask_after_fwd_ms"]
        row["fwd_bwd_ratio"] = row["padnet_fwd_bwd_ms"] / row["mask_after_fwd_bwd_ms"]
        rows.append(row)
        log(str({k2: round(v, 3) if isinstance(v, float) else v for k2, v in row.items()}))
    write("masked_aggregate", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
