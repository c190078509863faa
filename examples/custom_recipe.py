"""A complete custom training recipe: dict inputs, an MoE FFN, partition after warm-up.

Run:  python examples/custom_recipe.py   (a few seconds on a CPU; writes runs/example-recipe)

The recipe interface is documented in padnet/train/recipes/base.py and
docs/training.md. This toy task classifies whether a random sequence has a
positive mean; the model takes ``model(tokens=..., mask=...)`` like a
Hugging Face encoder and returns ``{"logits": ...}``.
"""

from __future__ import annotations

import torch
from torch import nn

import padnet
from padnet.train import resolve_config, train
from padnet.train.recipes import DataBundle, Recipe, register_recipe


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 12, 16, generator=g)
        self.y = (self.x.mean(dim=(1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"tokens": self.x[i], "mask": torch.ones(12)}, int(self.y[i])


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))  # -> MoEFeedForward
        self.classifier = nn.Linear(16, 2)

    def forward(self, tokens, mask):
        h = tokens + self.ffn(tokens)
        return {"logits": self.classifier((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))}


@register_recipe
class ToySequenceRecipe(Recipe):
    name = "toy-sequence"
    description = "random sequences, positive mean or not; a one-FFN encoder (MoE for dynamic / pad)"
    defaults = {
        "model": "tiny-encoder", "epochs": 3, "batch_size": 32, "lr": 3e-3, "optimizer": "adamw",
        "weight_decay": 0.01, "lr_schedule": "linear", "warmup_steps": 10, "augment": False,
        "partition_warmup_steps": 20,   # experts are upcycled (symmetric): warm up before IMP
        "partition_batches": 4,
    }
    options = {"train_size": 1024}

    def build_data(self, cfg):
        return DataBundle(SequenceDataset(cfg.options["train_size"], 0), SequenceDataset(256, 1), num_classes=2)

    def build_model(self, cfg, data):
        return TinyEncoder()

    def pad_config(self, cfg, model):
        return padnet.PadConfig(target_types=["ffn"], moe=padnet.MoEConfig(num_experts=cfg.num_kernels, top_k=2),
                                seed=cfg.seed)


if __name__ == "__main__":
    cfg = resolve_config({"recipe": "toy-sequence", "variant": "pad", "ratio": 0.3,
                          "output_dir": "runs/example-recipe"})
    summary = train(cfg, overwrite=True)
    print({k: summary[k] for k in ("test_accuracy", "partition_step", "dynamic_ratio")}, summary["params"])
