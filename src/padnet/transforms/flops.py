"""FLOPs via ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers.dynamic_conv import CompactDynamicConv2d, DynamicConv2d


def count_flops(model: nn.Module, example_input: Tensor | dict | tuple, per_sample: bool = True) -> int:
    """Forward FLOPs of ``model`` on ``example_input`` (a tensor, a tuple of args, or a kwargs dict).

    Counts the matmuls and convolutions torch's flop counter knows. Dynamic
    convolutions are counted in their weight-space form (kernel mixing plus
    one convolution per sample), the algorithmic cost, whatever speed backend
    the layers use. With ``per_sample=True`` the total is divided by the batch size.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops expects an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    backends = {m: m.backend for m in model.modules() if isinstance(m, (DynamicConv2d, CompactDynamicConv2d))}
    for m in backends:
        m.backend = "weight"
    try:
        with torch.no_grad(), counter:
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for m, backend in backends.items():
            m.backend = backend
    total = counter.get_total_flops()
    if per_sample:
        first = example_input
        if isinstance(first, dict):
            first = next(iter(first.values()))
        elif isinstance(first, tuple):
            first = first[0]
        total //= max(int(first.shape[0]), 1)
    return int(total)
