"""Every zoo model, dynamized (fully dynamic and PAD): forward, backward, gradients."""

import pytest
import torch

import padnet
from padnet.layers import pad_layers
from padnet.models import create_model

ZOO = [
    ("resnet10", dict(width=0.25)),
    ("resnet18", dict(width=0.25)),
    ("resnet34", dict(width=0.125)),
    ("resnet50", dict(width=0.125)),
    ("mobilenet_v2", dict(width_mult=0.25)),
]


@pytest.mark.parametrize("name, kwargs", ZOO)
@pytest.mark.parametrize("masks", ["dynamic", "pad"])
def test_dynamized_zoo_model_trains(name, kwargs, masks):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3, small_input=True, **kwargs)
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=3), seed=0))
    layers = list(pad_layers(model))
    assert layers, "no layer converted"
    if masks == "pad":
        g = torch.Generator().manual_seed(0)
        for _, layer in layers:
            layer.set_mode_mask("weight", (torch.rand(layer.mode_mask.shape, generator=g) < 0.3).float())
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert out.shape == (3, 5)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    # live entries learn: each layer's dynamic factors or static copy has a nonzero gradient
    for lname, layer in layers:
        assert layer.weight_dynamic.grad.abs().sum() + layer.weight_static.grad.abs().sum() > 0, lname
