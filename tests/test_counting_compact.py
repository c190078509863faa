"""Deployable counts, compact_ equivalence and size, save/load round trips."""

import copy

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import DynamicConv2d, is_compact_layer, pad_layers
from padnet.models import create_model


def random_masks_(model, ratio=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in pad_layers(model):
        for group in layer.mode_groups():
            layer.set_mode_mask(group.name, (torch.rand(group.shape, generator=g) < ratio).float())
    return model


def small_pad_resnet(ratio=0.3):
    model = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=0.25)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    return random_masks_(model, ratio).eval()


def test_count_formula_on_one_layer():
    layer = DynamicConv2d(8, 16, 3, num_kernels=4, bias=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer)
    random_masks_(model, 0.3)
    m, mb = layer.mode_mask, layer.bias_mode_mask
    counts = padnet.count_parameters(model)
    assert counts.static == int((1 - m).sum() + (1 - mb).sum())
    assert counts.dynamic == int(4 * (m.sum() + mb.sum()))
    assert counts.router == sum(p.numel() for p in layer.attention.parameters()) + 1  # + phi
    assert counts.other == 3 * 8 + 8
    assert counts.total == counts.static + counts.dynamic + counts.router + counts.other


def test_static_model_counts_match_numel_and_fully_dynamic_is_k_times():
    model = create_model("resnet18", num_classes=10, small_input=True, width=0.25)
    plain = sum(p.numel() for p in model.parameters())
    assert padnet.count_parameters(model).total == plain
    convs = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1")
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=4)))
    counts = padnet.count_parameters(model)
    assert counts.static == 0 and counts.dynamic == 4 * convs
    for _, layer in pad_layers(model):
        layer.set_all_modes(dynamic=False)
    counts = padnet.count_parameters(model)
    assert counts.dynamic == 0 and counts.static == convs


def test_pad_count_matches_design_formula():
    model = small_pad_resnet(0.3)
    counts = padnet.count_parameters(model)
    maskable = sum(g.mask.numel() for _, l in pad_layers(model) for g in l.mode_groups())
    live = sum(int(g.mask.sum()) for _, l in pad_layers(model) for g in l.mode_groups())
    assert counts.static + counts.dynamic == (maskable - live) + 4 * live


def test_compact_equivalence_and_stored_floats():
    model = small_pad_resnet(0.3)
    with torch.no_grad():  # non-trivial scales
        for _, layer in pad_layers(model):
            layer.scale.phi.fill_(0.25)
    x = torch.randn(6, 1, 28, 28)
    y = model(x)
    before = padnet.count_parameters(model)
    compact = padnet.compact_(copy.deepcopy(model))
    assert not list(pad_layers(compact))
    yc = compact(x)
    assert ((yc - y).norm() / y.norm()).item() <= 1e-5
    after = padnet.count_parameters(compact)
    assert (after.static, after.dynamic, after.other) == (before.static, before.dynamic, before.other)
    assert after.router == before.router - len(list(pad_layers(model)))  # the folded scale scalars
    stored = sum(
        p.numel() for m in compact.modules() if is_compact_layer(m) for p in m.parameters()
    )
    layer_counts = [c for n, c in padnet.layer_counts(compact).items() if n != "<other>"]
    assert stored == sum(c.static + c.dynamic + c.router for c in layer_counts)


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_compact_all_dynamic_and_all_static(ratio):
    model = small_pad_resnet()
    for _, layer in pad_layers(model):
        layer.set_all_modes(dynamic=bool(ratio))
    x = torch.randn(3, 1, 28, 28)
    y = model(x)
    compact = padnet.compact_(copy.deepcopy(model))
    torch.testing.assert_close(compact(x), y, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_pad_and_compact(tmp_path):
    model = small_pad_resnet(0.3)
    for _, layer in pad_layers(model):
        layer.temperature = 7.0
    x = torch.randn(2, 1, 28, 28)
    path = padnet.save(model, tmp_path / "pad.safetensors")
    loaded = padnet.load(path).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for (_, a), (_, b) in zip(pad_layers(model), pad_layers(loaded)):
        assert torch.equal(a.mode_mask, b.mode_mask) and b.temperature == 7.0
    compact = padnet.compact_(copy.deepcopy(model))
    cpath = padnet.save(compact, tmp_path / "compact.safetensors")
    cloaded = padnet.load(cpath).eval()
    torch.testing.assert_close(cloaded(x), compact(x), rtol=0, atol=0)
    assert padnet.count_parameters(cloaded) == padnet.count_parameters(compact)
    assert not list(tmp_path.glob("*.tmp"))


def test_save_load_user_model_needs_base(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    padnet.dynamize_(model, padnet.PadConfig(target_modules=["1"]))
    path = padnet.save(model, tmp_path / "m.safetensors")
    with pytest.raises(padnet.CheckpointError, match="pass the base model"):
        padnet.load(path)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    loaded = padnet.load(path, model=base)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_corrupt_and_mismatched_files(tmp_path):
    model = small_pad_resnet()
    path = padnet.save(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(padnet.CheckpointError, match="truncated.safetensors"):
        padnet.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(padnet.CheckpointError, match="corrupt"):
        padnet.load(junk)
    with pytest.raises(padnet.CheckpointError, match="no such"):
        padnet.load(tmp_path / "missing.safetensors")
    other = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=0.5)
    with pytest.raises(padnet.CheckpointError, match="do not fit"):
        padnet.load(path, model=other)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    model = small_pad_resnet()
    path = padnet.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(padnet.io.serialization, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        padnet.save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_flops_of_dynamic_model_close_to_static():
    static = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=0.25)
    x = torch.randn(2, 1, 28, 28)
    base = padnet.count_flops(static, x)
    dynamic = padnet.count_flops(padnet.dynamize_(static), x)
    assert base > 0 and base < dynamic < 1.2 * base
