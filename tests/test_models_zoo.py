import math

import pytest
import torch
from torch import nn

import padnet
from padnet.models import (
    MODEL_REGISTRY,
    create_model,
    list_models,
    mobilenet_v2,
    resnet10,
    resnet18,
    resnet34,
    resnet50,
)
from padnet.models.resnet import scale_channels

ALL_NAMES = ["resnet10", "resnet18", "resnet34", "resnet50", "mobilenet_v2"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_kwargs(name: str, **extra):
    """Cheap variant of each model: narrow and for small images."""
    width_key = "width_mult" if name == "mobilenet_v2" else "width"
    return {width_key: 0.25, "small_input": True, "num_classes": 7, **extra}


def basic_resnet_params(layers, num_classes=1000, in_chans=3, stem_kernel=7):
    """Independent closed-form count for a BasicBlock ResNet at width 1."""
    total = in_chans * 64 * stem_kernel**2 + 2 * 64
    in_ch = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            total += in_ch * planes * 9 + planes * planes * 9 + 4 * planes
            if in_ch != planes:
                total += in_ch * planes + 2 * planes
            in_ch = planes
    return total + 512 * num_classes + num_classes


@pytest.mark.parametrize(
    "fn, expected",
    [
        (resnet18, 11_689_512),
        (resnet34, 21_797_672),
        (resnet50, 25_557_032),
        (mobilenet_v2, 3_504_872),
    ],
)
def test_torchvision_parameter_counts(fn, expected):
    assert n_params(fn()) == expected


def test_resnet10_count_matches_formula():
    assert basic_resnet_params([2, 2, 2, 2]) == 11_689_512
    assert basic_resnet_params([3, 4, 6, 3]) == 21_797_672
    assert n_params(resnet10()) == basic_resnet_params([1, 1, 1, 1]) == 5_418_792
    small = resnet10(num_classes=10, in_chans=1, small_input=True)
    assert n_params(small) == basic_resnet_params([1, 1, 1, 1], 10, 1, stem_kernel=3)


def test_torchvision_module_names():
    r50 = resnet50().state_dict()
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer4.2.bn3.bias",
        "fc.weight",
    ]:
        assert key in r50
    r18 = resnet18().state_dict()
    assert "layer1.0.downsample.0.weight" not in r18
    assert "layer2.0.downsample.0.weight" in r18
    assert "layer4.1.bn2.weight" in r18
    mb = mobilenet_v2().state_dict()
    for key in [
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.1.conv.1.weight",
        "features.2.conv.3.running_mean",
        "features.18.0.weight",
        "classifier.1.weight",
    ]:
        assert key in mb


def test_architecture_details():
    m = resnet50()
    assert m.layer2[0].conv1.stride == (1, 1)
    assert m.layer2[0].conv2.stride == (2, 2)
    assert isinstance(m.maxpool, nn.MaxPool2d)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    mb = mobilenet_v2()
    assert isinstance(mb.classifier[0], nn.Dropout) and mb.classifier[0].p == 0.2
    assert mb.classifier[1].in_features == 1280
    assert mobilenet_v2(width_mult=1.4).last_channel == 1792


@pytest.mark.parametrize("name", ALL_NAMES)
@torch.no_grad()
def test_forward_224(name):
    model = MODEL_REGISTRY[name](num_classes=10).eval()
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_NAMES)
@torch.no_grad()
def test_small_input_28px_single_channel(name):
    model = create_model(name, num_classes=10, in_chans=1, small_input=True).eval()
    if name == "mobilenet_v2":
        assert model.features[0][0].stride == (1, 1)
        assert model.features[0][0].in_channels == 1
    else:
        assert isinstance(model.maxpool, nn.Identity)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert model.conv1.padding == (1, 1) and model.conv1.in_channels == 1
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_width_rule():
    assert [scale_channels(c, 1.0) for c in (64, 128, 256, 512)] == [64, 128, 256, 512]
    assert [scale_channels(c, 0.5) for c in (64, 128, 256, 512)] == [32, 64, 128, 256]
    assert scale_channels(64, 0.3) == 16
    assert scale_channels(64, 0.01) == 8
    assert resnet18(width=0.5).stage_channels == [32, 64, 128, 256]
    assert resnet50(width=0.5).num_features == 1024


@pytest.mark.parametrize("name", ALL_NAMES)
@torch.no_grad()
def test_width_scaling_reduces_params(name):
    key = "width_mult" if name == "mobilenet_v2" else "width"
    fn = MODEL_REGISTRY[name]
    full = fn(num_classes=10, small_input=True)
    narrow = fn(num_classes=10, small_input=True, **{key: 0.5})
    assert n_params(narrow) < n_params(full)
    assert narrow.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_backward_all_params_get_finite_grads(name):
    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name)).train()
    loss = model(torch.randn(2, 3, 28, 28)).logsumexp(dim=1).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_zero_init_residual():
    m = resnet18(zero_init_residual=True, width=0.25)
    assert all(b.bn2.weight.abs().sum() == 0 for s in (m.layer1, m.layer4) for b in s)
    m = resnet50(zero_init_residual=True, width=0.25)
    assert m.layer3[1].bn3.weight.abs().sum() == 0
    assert resnet18(width=0.25).layer1[0].bn2.weight.abs().sum() > 0


def test_create_model_records_spec():
    kwargs = small_kwargs("resnet18", in_chans=1)
    model = create_model("resnet18", **kwargs)
    spec = padnet.get_state(model).model_spec
    assert spec == {"name": "resnet18", "kwargs": kwargs}
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert n_params(rebuilt) == n_params(model)
    assert padnet.get_state(create_model("mobilenet_v2", width_mult=0.25)).model_spec == {
        "name": "mobilenet_v2",
        "kwargs": {"width_mult": 0.25},
    }


def test_registry_listing_and_unknown_name():
    # the vision zoo is registered (text models register themselves too)
    assert list_models() == sorted(MODEL_REGISTRY)
    assert set(ALL_NAMES) <= set(MODEL_REGISTRY)
    with pytest.raises(ValueError, match="unknown model 'resnet99'") as info:
        create_model("resnet99")
    for name in ALL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("fn", [resnet10, resnet18, resnet34, resnet50])
@pytest.mark.parametrize("width", [0, -0.5, math.nan, math.inf])
def test_resnet_bad_width(fn, width):
    with pytest.raises(ValueError, match="width must be a finite number > 0"):
        fn(width=width)


@pytest.mark.parametrize("width_mult", [0, -1.0, math.nan])
def test_mobilenet_bad_width(width_mult):
    with pytest.raises(ValueError, match="width_mult must be a finite number > 0"):
        mobilenet_v2(width_mult=width_mult)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("num_classes", [0, -3])
def test_bad_num_classes(name, num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        create_model(name, num_classes=num_classes)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_in_chans(name):
    with pytest.raises(ValueError, match="in_chans must be an integer >= 1"):
        create_model(name, in_chans=0)
