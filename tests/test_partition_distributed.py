"""partition_ under torch.distributed: 2 gloo processes, different data, identical masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers import DynamicConv2d, MoEFeedForward, pad_layers
from padnet.transforms.partition import partition_

from gloo_ranks import run_on_gloo_ranks

WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = DynamicConv2d(3, 6, 3, padding=1, bias=True, num_kernels=3, reduction=1, dtype=torch.float64)
        self.moe = MoEFeedForward(6, 10, num_experts=3, top_k=2, dtype=torch.float64)
        self.head = nn.Linear(6, 4, dtype=torch.float64)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(h + self.moe(h))


def build():
    torch.manual_seed(0)
    return Net()


def all_batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g))
            for _ in range(2 * WORLD)]


def masks(model):
    return {f"{n}:{g.name}": g.mask.detach().clone() for n, layer in pad_layers(model) for g in layer.mode_groups()}


def run_all(batches, seed):
    """The three partitions every rank (and the single-process reference) performs."""
    taylor = build()
    report = partition_(taylor, batches, F.cross_entropy, ratio=0.3, iterations=3)
    snip = build()
    partition_(snip, batches, F.cross_entropy, ratio=0.4, iterations=2, criterion="snip", scope="layer",
               granularity="kernel")
    rand = build()
    partition_(rand, None, None, ratio=0.5, criterion="random", iterations=2, seed=seed)
    return {"taylor": masks(taylor), "snip": masks(snip), "random": masks(rand),
            "num_batches": report.num_batches, "world_size": report.world_size}


def _rank_result(rank):
    mine = all_batches()[rank::WORLD]  # different data on every rank
    return run_all(mine, seed=100 + rank)  # different seeds: random must be broadcast from rank 0


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_single_process_on_union(tmp_path):
    results = run_on_gloo_ranks(_rank_result, WORLD, tmp_path)
    reference = run_all(all_batches(), seed=100)  # union of the data, rank 0's seed
    assert results[0]["num_batches"] == 2 * WORLD and results[0]["world_size"] == WORLD
    for kind in ("taylor", "snip", "random"):
        for key, ref_mask in reference[kind].items():
            assert torch.equal(results[0][kind][key], results[1][kind][key]), (kind, key)
            assert torch.equal(results[0][kind][key], ref_mask), (kind, key)
    assert reference["world_size"] == 1
