"""Benchmark: ModeScheduler overhead, amortised over a Fashion-MNIST ResNet-10 epoch.

Model and data as ``padnet train`` (ResNet-10 width 0.5, 3x3 stem, 28x28
Fashion-MNIST, batch 128, SGD momentum 0.9), PAD kappa = 0.3 and density 0.5
(``partition_(..., density=0.5)``, magnitude), then training steps
(forward + backward + optimizer step) with ``ModeScheduler.step()`` after each
(re-partition magnitude / growth gradient, prune magnitude / regrow gradient,
one probe batch of 128).

Measured per run (all in one process, one intra-op thread by default):

- ``step_s``: median training step without the scheduler;
- ``update_s``: median scheduler update (probe + scores + moves + transitions);
- ``idle_s``: median ``sched.step()`` on a non-update step;
- amortised overhead per epoch with ``update_interval`` I:
  ``(update_s + (I - 1) idle_s) / (I step_s)``.

``--epoch`` additionally trains one real epoch (469 steps) with the scheduler
and reports ``sched.seconds / train seconds`` directly (slow on a CPU).

    python benchmarks/bench_mode_scheduler.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import padnet  # noqa: E402
from padnet.data import DEFAULT_FASHION_MNIST_ROOT  # noqa: E402
from padnet.data.vision import FashionMNIST  # noqa: E402
from padnet.models import create_model  # noqa: E402
from padnet.transforms.partition import partition_  # noqa: E402
from padnet.transforms.scheduler import ModeScheduler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (median)")
    p.add_argument("--updates", type=int, default=5, help="timed scheduler updates (median)")
    p.add_argument("--epoch", action="store_true", help="also train one full epoch with the scheduler")
    p.add_argument("--data-dir", default=str(DEFAULT_FASHION_MNIST_ROOT))
    p.add_argument("--out", default=str(RESULTS / "mode_scheduler.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = FashionMNIST(args.data_dir, train=True)
    mean, std = 0.2860, 0.3530

    def batch(i: int):
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(len(data), (args.batch_size,), generator=g).tolist()
        xs, ys = zip(*(data[j] for j in idx))
        x = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(1, 28, 28) for v in xs])
        if x.max() > 1.5:
            x = x / 255.0
        return (x - mean) / std, torch.as_tensor(ys)

    model = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=args.width)
    padnet.dynamize_(model, padnet.PadConfig(num_kernels=4))
    partition_(model, None, None, ratio=0.3, density=0.5, criterion="magnitude", iterations=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    batches = [batch(i) for i in range(8)]
    steps_per_epoch = -(-60000 // args.batch_size)
    sched = ModeScheduler(model, opt, total_steps=10 * steps_per_epoch, update_interval=1,
                          end_step=10 * steps_per_epoch, prune="magnitude", regrow="gradient",
                          repartition="magnitude", growth="gradient",
                          data=lambda s: [batches[s % len(batches)]], loss_fn=F.cross_entropy)

    def train_step(i: int) -> float:
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for i in range(2):  # warm-up
        train_step(i)
    step_s = statistics.median(train_step(i) for i in range(args.steps))
    update_times = []
    for i in range(args.updates + 1):
        train_step(i)
        t0 = time.perf_counter()
        rec = sched.step()
        assert rec is not None
        update_times.append(time.perf_counter() - t0)
    update_s = statistics.median(update_times[1:])
    idle = ModeScheduler(model, opt, total_steps=10 ** 6, update_interval=10 ** 5, prune="magnitude",
                         repartition="magnitude", data=lambda s: [batches[0]], loss_fn=F.cross_entropy)
    idle_times = []
    for _ in range(200):
        t0 = time.perf_counter()
        idle.step()
        idle_times.append(time.perf_counter() - t0)
    idle_s = statistics.median(idle_times)
    interval = args.update_interval
    overhead = (update_s + (interval - 1) * idle_s) / (interval * step_s)
    result = {
        "benchmark": "mode_scheduler",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "threads": args.threads,
        "width": args.width,
        "batch_size": args.batch_size,
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "step_s": step_s,
        "update_s": update_s,
        "idle_step_s": idle_s,
        "update_interval": interval,
        "amortised_overhead": overhead,
        "updates_per_epoch": steps_per_epoch // interval,
        "note": "measured under load on a shared machine" if os.getloadavg()[0] > 1.0 else "idle machine",
    }
    if args.epoch:
        epoch_sched = ModeScheduler(model, opt, total_steps=steps_per_epoch, update_interval=interval,
                                    prune="magnitude", repartition="magnitude",
                                    data=lambda s: [batches[s % len(batches)]], loss_fn=F.cross_entropy)
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            train_step(i)
            epoch_sched.step()
        total = time.perf_counter() - t0
        result["epoch_seconds"] = total
        result["epoch_scheduler_seconds"] = epoch_sched.seconds
        result["epoch_overhead"] = epoch_sched.seconds / (total - epoch_sched.seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
