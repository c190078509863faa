"""The pruned mode (third mode per entry): math, counting, compact form, export, files, partition_(density)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.transforms.counting import count_parameters, deploy_storage
from padnet.io.exporters import export_program
from padnet.transforms import compact_
from padnet.transforms.compact import compact_layer
from padnet.layers import DynamicConv2d, MoEFeedForward, pad_layers
from padnet.models import create_model
from padnet.transforms.partition import partition_
from padnet.transforms.sparsity import erk_densities, layer_densities

pytestmark = pytest.mark.usefixtures("one_thread")


def random_modes(shape, p_live=0.5, p_dyn=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    live = (torch.rand(shape, generator=g) < p_live).double()
    dyn = live * (torch.rand(shape, generator=g) < p_dyn).double()
    return dyn, live


def conv_layer(bias=True, routing="softmax", seed=0):
    torch.manual_seed(seed)
    layer = DynamicConv2d(4, 6, 3, padding=1, bias=bias, num_kernels=3, reduction=1, routing=routing,
                          dtype=torch.float64)
    with torch.no_grad():
        layer.scale.phi.fill_(0.3)
    return layer


def reference_conv(layer, x, modes):
    """Plain float64 W_hat = lambda_d D sum_k pi_k W_k + lambda_s (L - D) W_s, one sample at a time."""
    lambda_s, lambda_d = layer.scales()
    pi = layer.routing_weights(x)
    d, l_ = modes["weight"]
    w = torch.einsum("bk,k...->b...", pi, lambda_d * d * layer.weight_dynamic) + lambda_s * (l_ - d) * layer.weight_static
    b = None
    if "bias" in modes:
        db, lb = modes["bias"]
        b = pi @ (lambda_d * db * layer.bias_dynamic) + lambda_s * (lb - db) * layer.bias_static
    out = [F.conv2d(x[i:i + 1], w[i], None if b is None else b[i], padding=1) for i in range(x.shape[0])]
    return torch.cat(out)


def prune_layer(layer, seed=0):
    modes = {}
    for i, g in enumerate(layer.mode_groups()):
        d, l_ = random_modes(g.shape, seed=seed + i)
        layer.set_modes(g.name, d, l_)
        modes[g.name] = (d, l_)
    return modes


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_conv_forward_and_gradients_match_reference(routing):
    layer = conv_layer(routing=routing)
    modes = prune_layer(layer)
    assert layer.has_pruned() and layer.mask_structure().kind == "element"
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, reference_conv(layer, x, modes), rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    dead = modes["weight"][1] == 0
    assert layer.weight_static.grad[dead].abs().max() == 0
    assert layer.weight_dynamic.grad[:, dead].abs().max() == 0
    assert layer.bias_static.grad[modes["bias"][1] == 0].abs().max() == 0
    # a live static entry does get gradient
    live_static = (modes["weight"][1] - modes["weight"][0]) > 0
    assert layer.weight_static.grad[live_static].abs().sum() > 0


def test_inference_cache_follows_live_mask_changes():
    layer = conv_layer().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        dense = layer(x)
        modes = prune_layer(layer)
        pruned = layer(x)
    assert not torch.allclose(dense, pruned)
    torch.testing.assert_close(pruned, reference_conv(layer, x, modes).detach(), rtol=1e-12, atol=1e-12)


def test_moe_forward_matches_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(6, 10, num_experts=3, top_k=2, dtype=torch.float64)
    modes = prune_layer(moe, seed=3)
    lambda_s, lambda_d = moe.scales()
    w = {}
    for g in moe.mode_groups():
        d, l_ = modes[g.name]
        w[g.name] = lambda_d * d * g.dynamic + lambda_s * (l_ - d) * g.static
    torch.testing.assert_close(moe.effective_weights()[0], w["in"])
    torch.testing.assert_close(moe.effective_weights()[3], w["bias_out"])
    x = torch.randn(5, 6, dtype=torch.float64)
    compact = compact_layer(moe)
    torch.testing.assert_close(compact(x), moe(x), rtol=1e-12, atol=1e-12)


def test_counts_and_compact_storage_of_a_pruned_layer():
    layer = conv_layer()
    modes = prune_layer(layer)
    k = layer.num_kernels
    expect_dyn = sum(int(d.sum()) * k for d, _ in modes.values())
    expect_sta = sum(int((l_ - d).sum()) for d, l_ in modes.values())
    counts = count_parameters(layer)
    assert (counts.dynamic, counts.static) == (expect_dyn, expect_sta)
    compact = compact_layer(layer)
    stored = sum(p.numel() for p in (compact.weight.static_values, compact.weight.dynamic_values,
                                     compact.bias.static_values, compact.bias.dynamic_values))
    assert stored == expect_dyn + expect_sta  # pruned entries store nothing
    model = nn.Sequential(compact)
    storage = deploy_storage(model)
    mask_bits = 2 * (layer.mode_mask.numel() + layer.bias_mode_mask.numel())
    assert storage["mask_bits"] == mask_bits
    values = sum(p.numel() * p.element_size() for p in model.parameters())
    assert storage["value_bytes"] == values
    assert storage["bytes"] == values + math.ceil(mask_bits / 8)


def test_set_modes_validates_before_writing():
    layer = conv_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    d, l_ = random_modes(layer.mode_mask.shape)
    bad = d.clone()
    bad[(l_ == 0)] = 1.0  # dynamic but pruned
    with pytest.raises(ValueError, match="marked dynamic but pruned"):
        layer.set_modes("weight", bad, l_)
    with pytest.raises(ValueError, match="live mask"):
        layer.set_modes("weight", d, l_ * 0.5)
    with pytest.raises(KeyError, match="no mode group"):
        layer.set_modes("nope", d, l_)
    assert set(layer.state_dict()) == set(before)  # no live mask registered by a failed call
    layer.set_modes("weight", d, l_)
    with pytest.raises(ValueError, match="marked dynamic but pruned"):
        layer.set_mode_mask("weight", torch.ones_like(d))
    layer.set_all_modes(True)
    torch.testing.assert_close(layer.mode_mask, layer.live_mask)


def test_unpruned_layers_keep_their_state_dict_and_old_files_load(tmp_path):
    model = create_model("resnet10", num_classes=4, width=0.25, in_chans=1, small_input=True)
    padnet.dynamize_(model, padnet.PadConfig(num_kernels=2))
    keys = set(model.state_dict())
    assert not any("live_mask" in k for k in keys)
    path = padnet.save(model, tmp_path / "old.safetensors")
    loaded = padnet.load(path)
    assert set(loaded.state_dict()) == keys
    assert all(layer.density() == 1.0 for _, layer in pad_layers(loaded))


def small_model():
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=4, width=0.25, in_chans=1, small_input=True)
    padnet.dynamize_(model, padnet.PadConfig(num_kernels=3))
    return model


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 12, 12, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def test_partition_with_density_kappa_03_density_05_compact_and_export(tmp_path):
    model = small_model().eval()
    report = partition_(model, batches(), F.cross_entropy, ratio=0.3, density=0.5, iterations=2)
    groups = [g for _, layer in pad_layers(model) for g in layer.mode_groups()]
    total = sum(g.mask.numel() for g in groups)
    live = sum(g.num_live() for g in groups)
    dyn = sum(int(g.mask.sum()) for g in groups)
    assert dyn == round(0.3 * total) == report.dynamic_entries
    for g in groups:  # uniform: every group exactly round(0.5 n)
        assert g.num_live() == math.floor(0.5 * g.mask.numel() + 0.5 + 1e-9)
        assert bool(((g.mask > 0) <= (g.live > 0)).all())
        assert g.static[g.live == 0].abs().max() == 0 and g.dynamic[:, g.live == 0].abs().max() == 0
    assert abs(live / total - 0.5) < 1e-3
    counts = count_parameters(model)
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        ref = model(x)
    compact_(model)
    stored = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("static_values", "dynamic_values")))
    assert stored == counts.static + counts.dynamic
    after = count_parameters(model)
    assert (after.static, after.dynamic) == (counts.static, counts.dynamic)
    with torch.no_grad():
        out = model(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    program = export_program(model, (torch.randn(2, 1, 12, 12),))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
    # compact files round-trip exactly
    path = padnet.save(model, tmp_path / "compact.safetensors")
    loaded = padnet.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


def test_pruned_training_form_round_trips(tmp_path):
    model = small_model().eval()
    partition_(model, None, None, ratio=0.2, density=0.6, criterion="magnitude", iterations=1,
               density_distribution="erk")
    path = padnet.save(model, tmp_path / "pruned.safetensors")
    loaded = padnet.load(path).eval()
    for (_, a), (_, b) in zip(pad_layers(model), pad_layers(loaded)):
        assert a.density() == b.density() and a.dynamic_ratio() == b.dynamic_ratio()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_fold_bn_with_pruned_bias_entries():
    torch.manual_seed(0)
    layer = DynamicConv2d(3, 5, 3, padding=1, bias=True, num_kernels=2, reduction=1)
    prune_layer(layer, seed=7)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = bn(layer.eval()(x))
        folded = compact_layer(layer).eval().fold_batchnorm_(bn)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_erk_densities_formula_cap_and_budget():
    shapes = {"a": (64, 32, 3, 3), "b": (8, 4, 3, 3), "bias": (64,)}
    d = erk_densities(shapes, 0.3)
    n = {k: math.prod(s) for k, s in shapes.items()}
    assert d["bias"] == 1.0 and d["b"] == 1.0  # capped
    assert abs(sum(d[k] * n[k] for k in shapes) - 0.3 * sum(n.values())) < 1e-6
    raw_a = sum(shapes["a"]) / n["a"]
    eps = (0.3 * sum(n.values()) - n["b"] - n["bias"]) / (raw_a * n["a"])
    assert abs(d["a"] - eps * raw_a) < 1e-12
    # uncapped: proportional to sum/prod
    d2 = erk_densities({"x": (100, 100), "y": (200, 50)}, 0.1)
    assert abs(d2["x"] / d2["y"] - (200 / 10000) / (250 / 10000)) < 1e-12
    assert layer_densities(small_model(), 0.4, "uniform")  # every group 0.4
    assert set(layer_densities(small_model(), 0.4, "uniform").values()) == {0.4}


@pytest.mark.parametrize("kwargs, match", [
    ({"density": 0.0}, "density must be in"),
    ({"density": 1.5}, "density must be in"),
    ({"density": 0.2}, "exceeds density"),
    ({"density": 0.5, "granularity": "channel"}, "granularity='element'"),
    ({"density": 0.5, "density_distribution": "gauss"}, "unknown density_distribution"),
    ({"density": 0.5, "prune_criterion": "snip"}, "unknown prune_criterion"),
])
def test_partition_density_bad_input_changes_nothing(kwargs, match):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        partition_(model, None, None, ratio=0.3, criterion="magnitude", iterations=1, **kwargs)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_failed_partition_restores_pruning():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(group, stats, layer):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        partition_(model, None, None, ratio=0.3, criterion=broken, iterations=1, density=0.5)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(layer.density() == 1.0 for _, layer in pad_layers(model))
