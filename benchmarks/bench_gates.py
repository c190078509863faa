"""Benchmark: one training step with learned mode gates against a PAD step with a fixed mask.

Same model, data and optimizer (SGD, momentum); the gated model adds
``gates.penalty()`` to the loss and steps the gates' own Adam. The fixed-mask
model carries the mask hardening would produce at the same ratio (element
masks: the general masked path, like the gates; ``--fixed-mask channel``
for a channel-structured mask and its fast path). Median of ``--repeats``
interleaved rounds of ``--steps`` steps after a warm-up; wall-clock and
process CPU time (steadier on a shared machine). Target: gates / fixed <= 1.4.

    python benchmarks/bench_gates.py --threads 1                      # ResNet-10 width 0.25, 28x28 Fashion-MNIST size
    python benchmarks/bench_gates.py --threads 1 --estimator arm      # ARM (one extra no-grad forward per step)
    python benchmarks/bench_gates.py --threads 1 --model moe          # a 2-layer MoE FFN stack (MiniLM sizes / 4)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, log, setup, write  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import padnet  # noqa: E402
from padnet.layers.moe import MoEFeedForward  # noqa: E402


def build(args) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if args.model == "moe":
        h, i = 96, 384
        model = nn.Sequential(MoEFeedForward(h, i, num_experts=args.num_kernels), nn.LayerNorm(h),
                              MoEFeedForward(h, i, num_experts=args.num_kernels), nn.Linear(h, 2))
        x = torch.randn(args.batch_size * 64, h)  # batch x 64 tokens
        y = torch.randint(0, 2, (x.shape[0],))
        return model, x, y
    from padnet.models import create_model

    model = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=args.width)
    padnet.dynamize_(model)  # K = 4 dynamic kernels (the default PadConfig)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    return model, x, y


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--model", default="resnet10", choices=("resnet10", "moe"))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-kernels", type=int, default=4, help="experts of the MoE stack (the convs use K=4)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--estimator", default="hard_concrete", choices=("hard_concrete", "arm"))
    p.add_argument("--granularity", default="element", choices=("element", "kernel", "channel"))
    p.add_argument("--fixed-mask", default="element", choices=("element", "channel"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--label", default="", help="free text stored with the result (e.g. 'under load')")
    args = p.parse_args(argv)
    info = setup(args)
    base, x, y = build(args)
    if args.model != "moe":
        base.train()
        base(x)  # routing statistics for the transitions
    fixed = copy.deepcopy(base)
    gated = copy.deepcopy(base)
    gates = padnet.ModeGates(gated, target_ratio=args.ratio, granularity=args.granularity, estimator=args.estimator)
    mask_gates = padnet.ModeGates(fixed, target_ratio=args.ratio, granularity=args.fixed_mask, init_noise=1.0)
    mask_gates.harden_()  # a fixed mask at the same ratio, through the same code path users take
    opt_fixed = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)
    opt_gated = torch.optim.SGD(gated.parameters(), lr=0.01, momentum=0.9)
    gates.remove_from_optimizer(opt_gated)
    opt_gates = gates.build_optimizer(lr=0.05)
    fixed.train(), gated.train()

    def step_fixed():
        opt_fixed.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fixed(x), y)
        loss.backward()
        opt_fixed.step()

    def step_gated():
        opt_gated.zero_grad(set_to_none=True)
        opt_gates.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gated(x), y)
        (loss + gates.penalty()).backward()
        if args.estimator == "arm":
            gates.arm_update_(loss, lambda: F.cross_entropy(gated(x), y))
        opt_gated.step()
        opt_gates.step()

    def timed(fn):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - w0) / args.steps, (time.process_time() - c0) / args.steps

    for fn in (step_fixed, step_gated):  # warm-up
        fn()
    rows = {"fixed": [], "gates": []}
    for r in range(args.repeats):
        rows["fixed"].append(timed(step_fixed))
        rows["gates"].append(timed(step_gated))
        log(f"round {r + 1}/{args.repeats}: fixed {rows['fixed'][-1][0] * 1e3:.1f} ms, "
            f"gates {rows['gates'][-1][0] * 1e3:.1f} ms")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    ratio_wall = med["gates"][0] / med["fixed"][0]
    ratio_cpu = med["gates"][1] / med["fixed"][1]
    print(f"{args.model} ({args.estimator}, {args.granularity} gates vs {args.fixed_mask} fixed mask, "
          f"threads {args.threads}): fixed {med['fixed'][0] * 1e3:.1f} ms, gates {med['gates'][0] * 1e3:.1f} ms "
          f"per step; ratio wall {ratio_wall:.3f}, cpu {ratio_cpu:.3f} (target <= 1.4)")
    name = f"gates_{args.model}_{args.estimator}_{args.granularity}_vs_{args.fixed_mask}"
    write(name, args, {"args": vars(args), "machine": info, "label": args.label,
                       "fixed_ms": med["fixed"][0] * 1e3, "gates_ms": med["gates"][0] * 1e3,
                       "fixed_cpu_ms": med["fixed"][1] * 1e3, "gates_cpu_ms": med["gates"][1] * 1e3,
                       "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu, "rounds": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
