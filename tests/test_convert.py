"""PadConfig and dynamize_: target matching, weight seeding, errors."""

import copy
import json

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import DynamicConv2d, pad_layers
from padnet.models import create_model


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


def names(model):
    return [n for n, _ in pad_layers(model)]


def test_default_targets_skip_stem_and_classifier():
    model = padnet.dynamize_(TinyNet())
    assert names(model) == ["body.0", "body.2"]
    assert isinstance(model.stem, nn.Conv2d)


def test_default_targets_on_resnet_skip_only_the_stem():
    model = create_model("resnet10", num_classes=10, small_input=True, width=0.25)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    padnet.dynamize_(model)
    assert names(model) == convs[1:]


def test_target_matching_exact_suffix_regex_and_exclude():
    assert names(padnet.dynamize_(TinyNet(), padnet.PadConfig(target_modules=["body.0"]))) == ["body.0"]
    assert names(padnet.dynamize_(TinyNet(), padnet.PadConfig(target_modules=["2"]))) == ["body.2"]
    assert names(padnet.dynamize_(TinyNet(), padnet.PadConfig(target_modules=r"(stem|body\.2)"))) == ["stem", "body.2"]
    cfg = padnet.PadConfig(target_types=["conv2d"], exclude_modules=["stem"])
    assert names(padnet.dynamize_(TinyNet(), cfg)) == ["body.0", "body.2"]


def test_inherited_weights_preserve_function_without_noise():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(noise_std=0.0)))
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_seed_makes_conversion_reproducible():
    base = TinyNet()
    m1 = padnet.dynamize_(copy.deepcopy(base), padnet.PadConfig(seed=3))
    m2 = padnet.dynamize_(copy.deepcopy(base), padnet.PadConfig(seed=3))
    m3 = padnet.dynamize_(copy.deepcopy(base), padnet.PadConfig(seed=4))
    torch.testing.assert_close(m1.body[0].weight_dynamic, m2.body[0].weight_dynamic)
    assert not torch.equal(m1.body[0].weight_dynamic, m3.body[0].weight_dynamic)


def test_fresh_init_differs_from_conv():
    model = TinyNet()
    w = model.body[0].weight.detach().clone()
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(init="fresh")))
    assert not torch.equal(model.body[0].weight_static, w)


def test_sequential_ffn_becomes_moe():
    from padnet.layers.moe import MoEFeedForward

    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Linear(24, 6)))
    padnet.dynamize_(model, padnet.PadConfig(target_modules=["1"], moe=padnet.MoEConfig(num_experts=3, top_k=2)))
    assert isinstance(model[1], MoEFeedForward)
    assert model(torch.randn(5, 6)).shape == (5, 6)


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = padnet.PadConfig(target_modules=["a", "b"], conv=padnet.DynamicConvConfig(num_kernels=6))
    assert padnet.PadConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert padnet.PadConfig.from_json(path) == cfg
    data = json.loads(cfg.to_json())
    assert data["version"] == 2 and data["conv"]["num_kernels"] == 6
    with pytest.raises(ValueError, match="unknown PadConfig keys"):
        padnet.PadConfig.from_dict({**data, "kernels": 3})
    with pytest.raises(ValueError, match="version"):
        padnet.PadConfig.from_dict({**data, "version": 99})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conv=dict(num_kernels=0)), "num_kernels"),
        (dict(moe=dict(top_k=5, num_experts=4)), "top_k"),
        (dict(conv=dict(init="zeros")), "init"),
        (dict(target_types=["lstm"]), "target type"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        padnet.PadConfig.from_dict(kwargs)


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_bad_ratio(ratio):
    # kappa is the partition's (PartitionConfig / partition_ ratio), validated by check_ratio
    from padnet.transforms.config import check_ratio

    with pytest.raises(ValueError, match=r"dynamic_ratio must be in \(0, 1\]"):
        check_ratio(ratio, "dynamic_ratio")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        padnet.partition_(padnet.dynamize_(TinyNet()), None, None, ratio=ratio, criterion="magnitude")


def test_unmatched_target_lists_convertible_modules():
    with pytest.raises(ValueError, match=r"matched no module; convertible modules: \['stem', 'body.0', 'body.2'\]"):
        padnet.dynamize_(TinyNet(), padnet.PadConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="cannot convert"):
        padnet.dynamize_(TinyNet(), padnet.PadConfig(target_modules=["fc"]))
    with pytest.raises(ValueError, match="no module matched"):
        padnet.dynamize_(nn.Sequential(nn.Linear(3, 3)))
