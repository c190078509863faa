"""Tensors kept for the backward of one training forward (allocator independent), ResNet-18 variants.

    python benchmarks/bench_saved_memory.py [--batch 32] [--width 1.0]

Counts the bytes of every distinct storage autograd saves during one forward
in train mode (``torch.autograd.graph.saved_tensors_hooks``), parameters and
buffers excluded: activations plus whatever weight-sized copies a layer keeps
(issue 15 item 5: masked factor copies of element-PAD training). Unlike the
resident-set high-water mark this does not depend on the allocator's state.
"""

from __future__ import annotations

import torch
from _common import base_parser, log, setup, write

import padnet
from padnet.layers import pad_layers
from padnet.models import create_model


def saved_bytes(variant: str, batch: int, width: float, ratio: float) -> int:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, small_input=True, width=width).train()
    if variant != "static":
        padnet.dynamize_(model)
        g = torch.Generator().manual_seed(1)
        for _, layer in pad_layers(model):
            shape = layer.mode_mask.shape
            if variant == "pad_element":
                layer.set_mode_mask("weight", (torch.rand(shape, generator=g) < ratio).float())
            elif variant == "pad_channel":
                rows = (torch.rand(shape[0], generator=g) < ratio).float()
                layer.set_mode_mask("weight", rows.view(-1, 1, 1, 1).expand(shape).clone())
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 3, 32, 32)).sum()
    return sum(seen.values())


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--ratio", type=float, default=0.3)
    args = p.parse_args()
    info = setup(args)
    rows = []
    for variant in ("static", "dynamic", "pad_element", "pad_channel"):
        mib = saved_bytes(variant, args.batch, args.width, args.ratio) / 2**20
        rows.append({"variant": variant, "batch": args.batch, "saved_MiB": mib})
        log(f"{variant}: {mib:.1f} MiB saved for backward")
    base = rows[0]["saved_MiB"]
    for r in rows:
        r["ratio"] = r["saved_MiB"] / base
    write("saved_memory", args, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
