"""Benchmark: cost of ``partition_`` against plain training passes.

Times ``partition_(criterion, T iterations x B batches)`` and the same number
(T * B) of plain forward + ``loss.backward()`` passes on the same model and
data (median of ``--repeats`` runs after one warm-up each; wall-clock and
process CPU time, the latter steadier on a shared machine). Plain passes run in
eval mode like the partitioner (``--baseline-mode train`` for train mode).
Masks are reset to all-dynamic before every partition run so each run does the
same work. Target: partition / plain <= 1.5.

    python benchmarks/bench_partition.py                      # resnet18, width 0.5, 32x32, T=5 x B=2
    python benchmarks/bench_partition.py --device cuda --width 1.0
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import padnet
from padnet.layers import pad_layers
from padnet.models import create_model, list_models, width_argument
from padnet.partition import partition_


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list_models())
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--no-small-input", action="store_true", help="ImageNet stem instead of the 3x3 CIFAR stem")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-kernels", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=5, help="T")
    p.add_argument("--batches", type=int, default=2, help="B (batches per iteration)")
    p.add_argument("--criterion", default="taylor")
    p.add_argument("--granularity", default="element")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline-mode", choices=("eval", "train"), default="eval")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    kw = {"num_classes": args.num_classes, "small_input": not args.no_small_input}
    kw[width_argument(args.model)] = args.width
    model = create_model(args.model, **kw)
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=args.num_kernels), seed=0))
    model.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
         torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device))
        for _ in range(args.batches)
    ]
    passes = args.iterations * args.batches
    entries = sum(gr.mask.numel() for _, layer in pad_layers(model) for gr in layer.mode_groups())

    def reset_masks():
        for _, layer in pad_layers(model):
            layer.set_all_modes(True)

    def run_partition():
        reset_masks()
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        partition_(model, batches, F.cross_entropy, ratio=args.ratio, criterion=args.criterion,
                   iterations=args.iterations, granularity=args.granularity)
        sync(device)
        return time.perf_counter() - t, time.process_time() - c

    def run_plain():
        model.train(args.baseline_mode == "train")
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for i in range(passes):
            x, y = batches[i % len(batches)]
            F.cross_entropy(model(x), y).backward()
        sync(device)
        elapsed = time.perf_counter() - t, time.process_time() - c
        model.zero_grad(set_to_none=True)
        return elapsed

    run_plain(), run_partition()  # warm-up
    plain, part = [], []
    for _ in range(args.repeats):  # interleaved so drifting machine load hits both alike
        plain.append(run_plain())
        part.append(run_partition())
    mp, mq = statistics.median(w for w, _ in plain), statistics.median(w for w, _ in part)
    cp, cq = statistics.median(c for _, c in plain), statistics.median(c for _, c in part)
    command = "python benchmarks/bench_partition.py" + ("" if not argv and len(sys.argv) <= 1 else " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    print(f"command: {command}")
    print(f"model: {args.model} width={args.width} small_input={not args.no_small_input} K={args.num_kernels}, "
          f"{entries:,} mask entries, device={device}, threads={torch.get_num_threads()}")
    print(f"work: {args.criterion}, T={args.iterations} x B={args.batches} batches of "
          f"{args.batch_size}x3x{args.image_size}x{args.image_size}; {passes} plain passes ({args.baseline_mode} mode)")
    def runs(values):
        return ", ".join(f"{w:.2f}/{c:.2f}" for w, c in values)

    print(f"plain forward+backward x{passes}: median wall {mp:.3f} s, cpu {cp:.3f} s  (runs wall/cpu: {runs(plain)})")
    print(f"partition_:                 median wall {mq:.3f} s, cpu {cq:.3f} s  (runs wall/cpu: {runs(part)})")
    ratio = mq / mp
    print(f"ratio partition / plain: wall {ratio:.2f}x, process cpu time {cq / cp:.2f}x  "
          f"(target <= 1.5x: {'OK' if ratio <= 1.5 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
