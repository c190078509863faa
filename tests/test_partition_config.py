"""``PartitionConfig``: one definition of the partition options for partition_, the trainer and the CLI."""

import argparse
import dataclasses
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from padnet.commands import partition as partition_cmd
from padnet.layers import DynamicConv2d, pad_layers
from padnet.train.config import TrainConfig, resolve_config
from padnet.transforms.partition import PartitionConfig, get_criterion, partition_
from padnet.transforms.partition.partitioner import partition_record


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        DynamicConv2d(3, 6, 3, padding=1, bias=True, num_kernels=3, reduction=1, dtype=torch.float64),
        torch.nn.ReLU(),
        DynamicConv2d(6, 4, 3, padding=1, num_kernels=3, reduction=1, dtype=torch.float64),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    with torch.no_grad():
        for i, (_, layer) in enumerate(pad_layers(model)):
            layer.scale.phi.fill_(0.3 * (i + 1))
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g))
            for _ in range(2)]


def masks(model):
    return [g.mask.clone() for _, layer in pad_layers(model) for g in layer.mode_groups()]


def test_defaults_match_the_documented_ones():
    cfg = PartitionConfig()
    assert dataclasses.asdict(cfg) == {
        "ratio": 0.3, "criterion": "taylor", "iterations": 5, "schedule": "exponential", "scope": "global",
        "granularity": "element", "num_batches": None, "warmup_steps": 0, "train_mode": False, "seed": 0,
        "criterion_kwargs": {}, "monotone": None, "preserve": True, "density": None,
        "density_distribution": "uniform", "prune_criterion": "magnitude",
    }


@pytest.mark.parametrize("change, error, message", [
    (dict(ratio=0), ValueError, r"ratio must be in \(0, 1\], got 0"),
    (dict(ratio=1.5), ValueError, r"ratio must be in \(0, 1\]"),
    (dict(ratio=math.nan), ValueError, r"ratio must be in \(0, 1\], got nan"),
    (dict(ratio="0.3"), TypeError, "ratio must be a number"),
    (dict(ratio=True), TypeError, "ratio must be a number"),
    (dict(criterion="vibes"), ValueError, "unknown criterion 'vibes'; registered criteria: .*taylor"),
    (dict(schedule="vibes"), ValueError, "unknown schedule 'vibes'; registered schedules: .*exponential"),
    (dict(iterations=0), ValueError, "iterations must be >= 1, got 0"),
    (dict(iterations=2.5), TypeError, "iterations must be an int >= 1"),
    (dict(scope="model"), ValueError, r"unknown scope 'model'; expected one of \('global', 'layer'\)"),
    (dict(granularity="block"), ValueError, "unknown granularity 'block'"),
    (dict(num_batches=0), ValueError, "num_batches must be >= 1"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(train_mode=1), TypeError, "train_mode must be a bool"),
    (dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(criterion_kwargs=[1]), TypeError, "criterion_kwargs must be a mapping"),
    (dict(criterion_kwargs={"gamma": torch.tensor(0.1)}), TypeError, "criterion_kwargs must hold JSON values"),
    (dict(criterion_kwargs={"eps": math.inf}), TypeError, "criterion_kwargs must hold JSON values"),
    (dict(monotone="yes"), TypeError, "monotone must be None or a bool"),
])
def test_bad_options_are_refused_on_construction_and_replace(change, error, message):
    with pytest.raises(error, match=message):
        PartitionConfig(**change)
    with pytest.raises(error, match=message):
        PartitionConfig().replace(**change)


def test_from_options_names_the_caller_spelling_and_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"--ratio must be in \(0, 1\]"):
        PartitionConfig.from_options({"ratio": 2.0}, labels={"ratio": "--ratio"})
    with pytest.raises(ValueError, match="unknown partition_scope 'x'"):
        PartitionConfig.from_options({"scope": "x"}, labels={"scope": "partition_scope"})
    with pytest.raises(ValueError, match=r"unknown partition options \['kappa'\]"):
        PartitionConfig.from_options({"kappa": 0.3})
    cfg = PartitionConfig.from_options({"ratio": 0.5, "criterion_kwargs": None})
    assert cfg == PartitionConfig(ratio=0.5) and cfg.criterion_kwargs == {}


def test_json_round_trip_and_object_criteria_stored_by_name():
    cfg = PartitionConfig(ratio=0.25, criterion="mest", iterations=2, schedule="cosine", scope="layer",
                          granularity="kernel", num_batches=3, warmup_steps=7, train_mode=True, seed=5,
                          criterion_kwargs={"gamma": 0.01}, monotone=False)
    assert PartitionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

    def my_schedule(t, T, kappa, start=1.0):
        return kappa

    obj = PartitionConfig(criterion=get_criterion("snip"), schedule=my_schedule)
    assert obj.to_dict()["criterion"] == "snip" and obj.to_dict()["schedule"] == "my_schedule"
    assert obj.schedule_name == "my_schedule"


def test_partition_accepts_a_config_or_the_same_keywords():
    options = dict(ratio=0.4, criterion="taylor", iterations=2, schedule="linear", scope="layer",
                   granularity="kernel", seed=3)
    a, b, c, d = tiny_model(), tiny_model(), tiny_model(), tiny_model()
    ra = partition_(a, batches(), F.cross_entropy, **options)
    rb = partition_(b, batches(), F.cross_entropy, PartitionConfig(**options))
    rc = partition_(c, batches(), F.cross_entropy, config=PartitionConfig(**options))
    # a config with keyword overrides: the keywords win
    rd = partition_(d, batches(), F.cross_entropy, config=PartitionConfig(ratio=0.9, scope="global"), ratio=0.4,
                    criterion="taylor", iterations=2, schedule="linear", scope="layer", granularity="kernel", seed=3)
    for m in (b, c, d):
        assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(m)))
    for r in (rb, rc, rd):
        assert (r.ratio, r.target_ratio, r.scope, r.schedule, r.granularity) == (
            ra.ratio, 0.4, "layer", "linear", "kernel")
    with pytest.raises(TypeError, match="PartitionConfig once"):
        partition_(tiny_model(), None, None, PartitionConfig(), config=PartitionConfig(), criterion="magnitude")
    with pytest.raises(TypeError, match="config must be a PartitionConfig"):
        partition_(tiny_model(), None, None, config={"ratio": 0.3})
    before = masks(tiny_model())
    model = tiny_model()
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        partition_(model, None, None, PartitionConfig(criterion="magnitude"), iterations=0)
    assert all(torch.equal(x, y) for x, y in zip(before, masks(model)))  # refused before anything changed


def test_partition_without_ratio_uses_the_config_default():
    model = tiny_model()
    report = partition_(model, None, None, criterion="magnitude", iterations=1)
    assert report.target_ratio == PartitionConfig().ratio == 0.3
    assert report.dynamic_entries == int(0.3 * report.entries + 0.5)


def test_partition_record_holds_options_and_achieved_ratios():
    model = tiny_model()
    cfg = PartitionConfig(ratio=0.5, criterion="magnitude", iterations=1)
    report = partition_(model, None, None, cfg)
    step = json.loads(json.dumps(partition_record(cfg, report)))  # JSON-serialisable
    assert {k: step[k] for k in cfg.to_dict()} == cfg.to_dict()
    assert step["achieved_ratio"] == report.ratio and step["dynamic_entries"] == report.dynamic_entries
    assert step["layer_ratios"] == {row.name: row.ratio_after for row in report.layers}
    assert set(step["layer_ratios"]) == {"0", "2"}


def test_partition_calls_the_record_api(monkeypatch):
    """``get_state(model).append("partition", **params)`` once per call (PadState API of the plan)."""
    from padnet.transforms.partition import partitioner

    calls = []

    class FakeState:
        def append(self, op, **params):
            calls.append((op, params))

    monkeypatch.setattr(partitioner, "get_state", lambda model: FakeState())
    model = tiny_model()
    cfg = PartitionConfig(ratio=0.5, criterion="magnitude", iterations=1)
    report = partition_(model, None, None, cfg)
    assert calls == [("partition", partition_record(cfg, report))]
    calls.clear()
    with pytest.raises(ValueError):
        partition_(model, None, None, cfg, criterion="taylor")  # needs data: fails, records nothing
    assert calls == []


@pytest.mark.skipif(importlib.util.find_spec("padnet.transforms.record") is None,
                    reason="the transform record (padnet.transforms.record) is not merged yet")
def test_partition_is_appended_to_the_transform_record():
    from padnet.transforms.record import get_state

    model = tiny_model()
    cfg = PartitionConfig(ratio=0.5, criterion="magnitude", iterations=1)
    report = partition_(model, None, None, cfg)
    steps = get_state(model).to_dict()["steps"]
    assert steps[-1]["op"] == "partition"
    assert steps[-1]["params"] == partition_record(cfg, report)


def test_trainer_builds_its_partition_config_from_its_settings():
    cfg = resolve_config({"variant": "pad", "ratio": 0.25, "criterion": "magnitude", "partition_iterations": 2,
                          "partition_schedule": "cosine", "partition_scope": "layer",
                          "partition_granularity": "channel", "partition_batches": 3,
                          "partition_warmup_steps": 5, "partition_train_mode": False, "seed": 4})
    assert cfg.partition_config() == PartitionConfig(
        ratio=0.25, criterion="magnitude", iterations=2, schedule="cosine", scope="layer", granularity="channel",
        num_batches=3, warmup_steps=5, train_mode=False, seed=4)
    # shared defaults come from PartitionConfig; the trainer sets its own batches and train mode
    d, p = TrainConfig(), PartitionConfig()
    assert (d.criterion, d.partition_iterations, d.partition_schedule, d.partition_scope,
            d.partition_granularity, d.partition_warmup_steps) == (
        p.criterion, p.iterations, p.schedule, p.scope, p.granularity, p.warmup_steps)
    assert resolve_config({"variant": "pad"}).ratio == p.ratio
    for settings, message in [
        ({"partition_iterations": 0}, "partition_iterations must be >= 1"),
        ({"partition_iterations": "two"}, "partition_iterations must be an integer"),  # ValueError, not TypeError
        ({"partition_iterations": 2.5}, "partition_iterations must be an int"),
        ({"partition_batches": 0}, "partition_batches must be >= 1"),
        ({"partition_warmup_steps": -1}, "partition_warmup_steps must be >= 0"),
        ({"partition_scope": "model"}, "unknown partition_scope 'model'"),
        ({"partition_granularity": "block"}, "unknown partition_granularity 'block'"),
        ({"partition_schedule": "vibes"}, "unknown schedule 'vibes'"),
        ({"ratio": 0.0}, r"--ratio must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_config({"variant": "pad", **settings})


def test_cli_builds_the_config_from_flags():
    parser = argparse.ArgumentParser()
    partition_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["partition", "m.safetensors", "--ratio", "0.2", "--criterion", "snip",
                              "--iterations", "3", "--schedule", "linear", "--scope", "layer",
                              "--granularity", "kernel", "--batches", "2", "--seed", "9"])
    assert partition_cmd.partition_config(args) == PartitionConfig(
        ratio=0.2, criterion="snip", iterations=3, schedule="linear", scope="layer", granularity="kernel",
        num_batches=2, seed=9)
    defaults = parser.parse_args(["partition", "m.safetensors"])
    cfg = partition_cmd.partition_config(defaults)
    p = PartitionConfig()
    assert (cfg.ratio, cfg.criterion, cfg.iterations, cfg.schedule, cfg.scope, cfg.granularity, cfg.seed) == (
        p.ratio, p.criterion, p.iterations, p.schedule, p.scope, p.granularity, p.seed)
    with pytest.raises(ValueError, match="--batches must be >= 1"):
        partition_cmd.partition_config(parser.parse_args(["partition", "m", "--batches", "0"]))


def test_cli_default_ratio_is_the_last_recorded_partition_else_the_config_default(monkeypatch):
    from padnet.transforms.partition import partitioner

    parser = argparse.ArgumentParser()
    partition_cmd.register(parser.add_subparsers())
    plain = parser.parse_args(["partition", "m.safetensors"])
    explicit = parser.parse_args(["partition", "m.safetensors", "--ratio", "0.2"])
    recorded = {}

    class Step:
        def __init__(self, params):
            self.params = params

    class State:
        def last(self, op):
            return Step(dict(recorded)) if op == "partition" and recorded else None

    monkeypatch.setattr(partitioner, "find_state", lambda model: State())
    model = tiny_model()
    assert partition_cmd.partition_config(plain, model).ratio == 0.3  # nothing recorded: the default
    recorded.update(ratio=0.45, criterion="taylor")
    assert partition_cmd.partition_config(plain, model).ratio == 0.45
    assert partition_cmd.partition_config(explicit, model).ratio == 0.2  # --ratio wins
    recorded["ratio"] = 5.0  # a hostile file header
    with pytest.raises(ValueError, match=r"the ratio recorded in the model's last partition must be in \(0, 1\]"):
        partition_cmd.partition_config(plain, model)
    monkeypatch.setattr(partitioner, "find_state", lambda model: None)  # a model padnet never recorded
    assert partition_cmd.partition_config(plain, model).ratio == 0.3


@pytest.mark.skipif(importlib.util.find_spec("padnet.transforms.record") is None,
                    reason="the transform record (padnet.transforms.record) is not merged yet")
def test_cli_default_ratio_survives_save_and_load(tmp_path):
    import padnet
    from padnet.models import create_model

    model = create_model("resnet10", small_input=True, width=0.25, num_classes=5)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    partition_(model, None, None, ratio=0.4, criterion="magnitude", iterations=1)
    path = tmp_path / "m.safetensors"
    padnet.save(model, path)
    parser = argparse.ArgumentParser()
    partition_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["partition", str(path)])
    assert partition_cmd.partition_config(args, padnet.load(path)).ratio == 0.4
