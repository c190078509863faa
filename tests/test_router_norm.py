"""``router_norm="batch"``: a BatchNorm on the dynamic conv router's hidden units (issue 11's routing spread).

Checked against a plain float64 reference of the router, for gradients, batch-1
training, the config round trip, save/load of the PAD and compact forms, and
bad values; tests/test_third_party_patterns.py runs its whole matrix (training,
channels_last, partition, compact, BN folding, save/load, export) on a
MobileNetV3-style model with the router BatchNorm too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.layers.dynamic_conv import DynamicConv2d, KernelAttention, RouterBatchNorm


def _reference_logits(att: KernelAttention, x: torch.Tensor, training: bool) -> torch.Tensor:
    """float64 router: pool -> fc1 -> BatchNorm (batch or running statistics) -> ReLU -> fc2."""
    d = torch.float64
    h = x.to(d).mean(dim=(2, 3)) @ att.fc1.weight.to(d).T + att.fc1.bias.to(d)
    bn = att.norm
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean.to(d), bn.running_var.to(d)
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.to(d) + bn.bias.to(d)
    return F.relu(h) @ att.fc2.weight.to(d).T + att.fc2.bias.to(d)


def test_default_is_the_official_router_without_norm():
    layer = DynamicConv2d(8, 8, 3, padding=1)
    assert layer.router_norm == "none" and layer.attention.norm is None
    assert not any("norm" in k for k in layer.state_dict())


def test_batch_norm_router_matches_reference_in_train_and_eval():
    torch.manual_seed(0)
    layer = DynamicConv2d(16, 8, 3, padding=1, router_norm="batch")
    att = layer.attention
    assert isinstance(att.norm, RouterBatchNorm)
    x = torch.randn(6, 16, 5, 5) + 3.0  # a large common offset: the pooled inputs barely differ
    layer.train()
    before = att.norm.running_mean.clone()
    torch.testing.assert_close(att(x).double(), _reference_logits(att, x, training=True), rtol=1e-5, atol=1e-5)
    assert not torch.equal(att.norm.running_mean, before)  # training updates the running statistics
    layer.eval()
    torch.testing.assert_close(att(x).double(), _reference_logits(att, x, training=False), rtol=1e-5, atol=1e-5)


def test_batch_norm_makes_routing_input_dependent_under_a_common_offset():
    """Pooled inputs = shared offset + small per-sample part: normalised hidden units route by the small part."""
    torch.manual_seed(0)
    x = 5.0 + 0.05 * torch.randn(64, 32, 4, 4)
    spreads = {}
    for norm in ("none", "batch"):
        torch.manual_seed(1)
        layer = DynamicConv2d(32, 8, 3, padding=1, router_norm=norm).train()
        spreads[norm] = float(layer.routing_weights(x).detach().std(0).mean())
    assert spreads["batch"] > 5 * spreads["none"], spreads


def test_gradients_reach_the_norm_and_fc1():
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3, padding=1, router_norm="batch").train()
    layer(torch.randn(4, 8, 6, 6)).square().mean().backward()
    for p in (layer.attention.norm.weight, layer.attention.norm.bias, layer.attention.fc1.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_batch_of_one_in_training_uses_running_statistics_and_leaves_them():
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3, padding=1, router_norm="batch").train()
    layer(torch.randn(4, 8, 6, 6))  # some running statistics
    bn = layer.attention.norm
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(1, 8, 6, 6)
    y = layer(x)  # nn.BatchNorm1d would raise here
    y.sum().backward()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(layer.attention(x).double(), _reference_logits(layer.attention, x, training=False),
                               rtol=1e-5, atol=1e-5)


def test_bad_router_norm_is_rejected():
    with pytest.raises(ValueError, match="router_norm"):
        DynamicConv2d(4, 4, 3, router_norm="layer")
    with pytest.raises(ValueError, match="router_norm"):
        KernelAttention(4, 4, 4, norm="group")
    with pytest.raises(ValueError, match="router_norm"):
        padnet.PadConfig.from_dict({"version": 2, "conv": {"router_norm": "instance"}})


def test_config_round_trip_and_older_configs_default_to_none():
    cfg = padnet.PadConfig.from_dict({"version": 2, "conv": {"router_norm": "batch"}})
    assert cfg.conv.router_norm == "batch"
    assert padnet.PadConfig.from_dict(cfg.to_dict()).conv.router_norm == "batch"
    assert padnet.PadConfig.from_dict({"version": 2, "conv": {}}).conv.router_norm == "none"


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def _partitioned_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _model()
    cfg = padnet.PadConfig.from_dict({"version": 2, "conv": {"router_norm": "batch", "init": "fresh"}})
    padnet.dynamize_(model, cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 5, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    padnet.partition_(model, [(x, y)], F.cross_entropy, ratio=0.5, iterations=1)
    return model.eval(), x


def test_pad_and_compact_forms_save_load_exactly(tmp_path):
    model, x = _partitioned_model()
    assert all(m.attention.norm is not None for m in model.modules() if isinstance(m, DynamicConv2d))
    with torch.no_grad():
        ref = model(x)
        compact = padnet.compact_(copy.deepcopy(model)).eval()
        torch.testing.assert_close(compact(x), ref, rtol=1e-5, atol=1e-6)
    for form, m in (("pad", model), ("compact", compact)):
        path = padnet.save(m, tmp_path / f"{form}.safetensors")
        torch.manual_seed(7)
        loaded = padnet.load(path, model=_model()).eval()
        assert loaded.state_dict().keys() == m.state_dict().keys()
        assert any(k.endswith("attention.norm.running_mean") for k in loaded.state_dict()), form
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x)), form
