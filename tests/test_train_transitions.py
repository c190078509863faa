"""Trainer: partition at any step with function-preserving transitions, resume after it, routing metrics."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from padnet.train import resolve_config, resume_config, train
from padnet.train.recipes import DataBundle, Recipe, register_recipe, unregister_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


class _Images(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (self.x[:, 0].mean(dim=(1, 2)) > self.x[:, 1].mean(dim=(1, 2))).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(torch.relu(self.stem(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class _ToyConvRecipe(Recipe):
    name = "toy-conv"
    description = "toy: a dynamic conv, partition mid-training"
    defaults = {"model": "toy", "epochs": 3, "batch_size": 16, "lr": 0.05, "optimizer": "sgd",
                "partition_warmup_steps": 6, "partition_batches": 2, "partition_iterations": 2, "augment": False,
                "temperature_start": 5.0, "temperature_anneal_fraction": 0.25,
                "pad_config": {"init": "fresh", "router_init": "official"}}
    calls = 0
    fail_at = -1

    def build_data(self, cfg):
        return DataBundle(_Images(64, 0), _Images(32, 1), num_classes=2)

    def build_model(self, cfg, data):
        return _ConvNet()

    def forward(self, model, inputs):
        type(self).calls += 1
        if type(self).calls == type(self).fail_at:
            raise RuntimeError("simulated crash")
        return super().forward(model, inputs)


@pytest.fixture
def toy_conv():
    register_recipe(_ToyConvRecipe, overwrite=True)
    _ToyConvRecipe.calls = 0
    _ToyConvRecipe.fail_at = -1
    yield _ToyConvRecipe
    unregister_recipe("toy-conv")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(out, **flags):
    cfg = resolve_config({"recipe": "toy-conv", "variant": "pad", "ratio": 0.4, "output_dir": str(out),
                          "quiet": True, **flags})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg)


def test_partition_at_step_logs_losses_resets_state_and_resumes_bit_exactly(toy_conv, tmp_path):
    full = tmp_path / "full"
    s = _run(full)
    part = s["partition"]
    assert s["partition_step"] == 6  # mid epoch 2 (4 steps per epoch)
    assert part["preserve"] is True and part["transition"]["preserve"] is True
    assert part["transition"]["to_static"] > 0
    assert part["transition"]["optimizer_entries_reset"] > 0  # momentum of the entries that changed mode
    assert math.isfinite(part["loss_before"]) and math.isfinite(part["loss_after"])
    assert "loss on the partition batches" in (full / "train.log").read_text()
    assert s["pad_config"]["conv"]["init"] == "fresh" and s["pad_config"]["conv"]["router_init"] == "official"
    rows = _rows(full)
    for row in rows:
        assert 0.0 <= row["routing_entropy"] <= 1.0 and row["routing_std"] >= 0.0
        assert 0.0 <= row["kernel_spread"] <= 2.0 and set(row["routing"]) == {"conv"}
    assert rows[0]["temperature"] == pytest.approx(1.0)  # annealed over 25 % of the 12 steps

    # crash in epoch 3, after the checkpoint of epoch 2 (taken after the partition), then resume
    killed = tmp_path / "killed"
    _ToyConvRecipe.calls = 0
    _ToyConvRecipe.fail_at = 3 * (4 + 1) + 2  # epochs of 4 train steps + 1 eval batch; partition passes extra
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(killed)
    assert len(_rows(killed)) == 2  # the checkpoint after epoch 2 holds the partitioned state
    _ToyConvRecipe.fail_at = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s2 = train(resume_config(killed, {"quiet": True}), resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(killed)) == strip(rows)
    assert s2["partition"]["loss_after"] == part["loss_after"]
    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wb.keys() and "conv.routing_mean" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_preserve_keeps_the_partition_batch_loss(toy_conv, tmp_path):
    changes = {}
    for preserve in (True, False):
        _ToyConvRecipe.calls = 0
        s = _run(tmp_path / f"p{preserve}", partition_preserve=preserve, epochs=2, partition_warmup_steps=7,
                 optimizer="adamw", lr=0.01, ratio=0.2, criterion="magnitude")
        p = s["partition"]
        assert p["preserve"] is preserve
        changes[preserve] = abs(p["loss_after"] - p["loss_before"])
    assert changes[True] < changes[False], changes


def test_flags_and_bad_values(capsys):
    from padnet.cli import main

    cfg = resolve_config({"recipe": "fashion-mnist", "partition_warmup_steps": 5})
    assert cfg.partition_preserve is True and cfg.temperature_anneal_fraction is None
    assert (cfg.temperature_start, cfg.temperature_end, cfg.temperature_epochs) == (30.0, 2.0, 3.0)
    # vision: trained from scratch, router with a BatchNorm on its hidden units
    assert cfg.pad_config == {"init": "fresh", "router_init": "official", "router_norm": "batch"}
    for key, value, match in (("temperature_anneal_fraction", 1.5, "temperature_anneal_fraction"),
                              ("temperature_anneal_fraction", -0.1, "temperature_anneal_fraction"),
                              ("partition_preserve", "maybe", "partition_preserve")):
        with pytest.raises(ValueError, match=match):
            resolve_config({"recipe": "fashion-mnist", key: value})
    from padnet.train.recipes import get_recipe

    bad = resolve_config({"recipe": "fashion-mnist", "pad_config": {"router_init": "zeros"}})
    with pytest.raises(ValueError, match="router_init"):
        get_recipe("fashion-mnist").pad_config(bad, None)
    assert main(["train", "--partition-at-step", "-1", "--output-dir", "/nonexistent/x", "--quiet"]) == 2
    assert "partition_warmup_steps must be >= 0, got -1" in capsys.readouterr().err


def test_explicit_temperature_epochs_override_the_recipe_fraction(toy_conv):
    assert resolve_config({"recipe": "toy-conv"}).temperature_anneal_fraction == 0.25
    cfg = resolve_config({"recipe": "toy-conv", "temperature_epochs": 1})
    assert cfg.temperature_anneal_fraction is None and cfg.temperature_epochs == 1
    cfg = resolve_config({"recipe": "toy-conv", "temperature_epochs": 1, "temperature_anneal_fraction": 0.2})
    assert cfg.temperature_anneal_fraction == 0.2
