"""MoE benchmark: top-2 of 4 experts vs a dense FFN with the same active parameters (2*I).

    python benchmarks/bench_moe.py [--tokens 512,4096] [--hidden 384 --intermediate 1536]
    python benchmarks/bench_moe.py --gated --threads 1     # SwiGLU experts vs a dense SwiGLU FFN

Variants: ``moe_layer`` (MoEFeedForward, combines masks every call),
``compact_moe`` (deploy form), ``dispatch_only`` (routing + padnet dispatch on
fixed effective weights), ``naive_dispatch_only`` (the original cat +
index_add dispatch, the peer baseline), ``dense_dispatch_only(export path)``.

``--gated``: LLaMA-style experts ``down(silu(gate(x)) * up(x))`` (no biases) vs
a dense gated FFN of intermediate size ``top_k * I`` (the same active
parameters per token); variants ``moe_layer``, ``compact_moe``,
``dispatch_only`` and ``dense_dispatch_only(export path)``.
"""

from __future__ import annotations

import os

import torch
from _common import base_parser, log, setup, write
from torch import nn

import latency


class DenseGatedFFN(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases (LLaMA MLP)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class GatedDispatchOnly(nn.Module):
    """Routing + dispatch on fixed (precombined) effective gated expert weights."""

    def __init__(self, moe, impl: str) -> None:
        super().__init__()
        self.moe, self.impl = moe, impl
        with torch.no_grad():
            self.w = [None if w is None else w.detach().clone() for w in moe.effective_weights()]
            self.g = [None if w is None else w.detach().clone() for w in moe.effective_gate_weights()]

    def forward(self, x):
        from padnet.layers.moe import moe_dispatch

        idx, gates, _ = self.moe.select_experts(x)
        return moe_dispatch(x, idx, gates, *self.w, self.moe.act, impl=self.impl, w_gate=self.g[0], b_gate=self.g[1])


def gated_suite(tokens, hidden, intermediate, num_experts, top_k, modes, repeats) -> list[dict]:
    from padnet.layers import MoEFeedForward
    from padnet.transforms.compact import compact_layer

    torch.manual_seed(0)
    dense = DenseGatedFFN(hidden, top_k * intermediate)
    moe = MoEFeedForward(hidden, intermediate, num_experts=num_experts, top_k=top_k, activation="silu",
                         bias=False, gated=True)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.02)
    variants = {
        "dense_gated_ffn": dense,
        "moe_layer": moe,
        "compact_moe": compact_layer(moe),
        "dispatch_only": GatedDispatchOnly(moe, "sorted"),
        "dense_dispatch_only(export path)": GatedDispatchOnly(moe, "dense"),
    }
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden)
        for mode in modes:
            subjects = variants if mode == "fwd" else {k: v for k, v in variants.items() if "only" not in k}
            for m in subjects.values():
                m.train(mode != "fwd")
            fns = {k: (latency._fwd(m, x) if mode == "fwd" else latency._fwd_bwd(m, x)) for k, m in subjects.items()}
            load = os.getloadavg()[0]
            timings = latency.time_interleaved(fns, repeats=repeats, warmup=1, min_round_s=0.02)
            base = timings["dense_gated_ffn"]
            for name, t in timings.items():
                rows.append({"tokens": n, "mode": mode, "variant": name, "ms": t.median * 1e3,
                             "ratio": t.median / base.median, "cpu_ratio": t.cpu_median / base.cpu_median,
                             "load": round(load, 2)})
            log(f"gated MoE N={n} {mode}: dense {base.median * 1e3:.2f} ms; " + ", ".join(
                f"{k}={t.median / base.median:.2f}x" for k, t in timings.items() if k != "dense_gated_ffn"))
    return rows


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--tokens", default="512,4096")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--gated", action="store_true", help="gated (SwiGLU) experts vs a dense gated FFN")
    args = p.parse_args()
    info = setup(args)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    modes = tuple(args.modes.split(","))
    if args.gated:
        rows = gated_suite(tokens, args.hidden, args.intermediate, args.experts, args.top_k, modes, args.repeats)
    else:
        rows = latency.moe_suite(tokens, args.hidden, args.intermediate, args.experts, args.top_k,
                                 modes=modes, repeats=args.repeats, log=log)
    print(latency.format_rows(rows, ["tokens", "mode", "variant", "ms", "ratio", "cpu_ratio", "load"]))
    write("moe_gated" if args.gated else "moe", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
