"""Dynamic convs followed by in-place activations (issue 14 item 1) and bad conv geometry (item 12)."""

import copy

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import CompactDynamicConv2d, DynamicConv2d, pad_layers

pytestmark = pytest.mark.usefixtures("one_thread")


class SqueezeExcite(nn.Module):
    """torchvision/timm-style SE block: pool -> 1x1 conv -> ReLU(inplace) -> 1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels: int, inplace: bool = True):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.act = nn.ReLU(inplace=inplace)
        self.expand = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        s = self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


def conv_relu_net(inplace: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(inplace=inplace),
        SqueezeExcite(8, inplace=inplace),
        nn.Conv2d(8, 8, 1), nn.ReLU6(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


def set_masks(model: nn.Module, kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    for _, layer in pad_layers(model):
        shape = layer.mode_mask.shape
        if kind == "ones":
            mask = torch.ones(shape)
        elif kind == "zeros":
            mask = torch.zeros(shape)
        elif kind == "channel":
            rows = (torch.rand(shape[0], generator=g) < 0.4).double()
            rows[0], rows[1] = 1.0, 0.0
            mask = rows.view(-1, 1, 1, 1).expand(shape).clone()
        else:
            mask = (torch.rand(shape, generator=g) < 0.3).double()
        layer.set_mode_mask("weight", mask)
        with torch.no_grad():
            layer.scale.phi.fill_(0.2)


@pytest.mark.parametrize("kind", ["ones", "element", "channel", "zeros"])
@pytest.mark.parametrize("batch", [1, 4])
def test_inplace_activation_after_dynamic_conv_trains_like_out_of_place(kind, batch):
    model = padnet.dynamize_(conv_relu_net(inplace=True))
    assert len(list(pad_layers(model))) >= 3
    set_masks(model, kind)
    reference = copy.deepcopy(model)
    for m in reference.modules():  # same model, every activation out of place
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(batch, 3, 8, 8, dtype=torch.double)
    loss = model(x).square().sum()
    loss.backward()  # raised "Output 0 of _ZeroGradLink is a view and is being modified inplace" before
    ref_loss = reference(x).square().sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["auto", "weight", "bmm", "output"])
def test_inplace_activation_after_every_backend_and_the_deploy_form(backend):
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, backend=backend).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.double)
    out = torch.relu_(layer(x))
    out.sum().backward()
    ref = torch.relu(copy.deepcopy(layer)(x))
    torch.testing.assert_close(out, ref)
    compact = CompactDynamicConv2d(layer)
    torch.relu_(compact(x)).sum().backward()
    assert compact.weight.dynamic_values.grad is not None


def test_input_smaller_than_kernel_is_a_clear_error():
    layer = DynamicConv2d(3, 4, 5)
    for batch in (1, 3):
        with pytest.raises(ValueError, match="smaller than the kernel"):
            layer(torch.randn(batch, 3, 4, 4))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        CompactDynamicConv2d(layer)(torch.randn(2, 3, 2, 7))
    layer.set_all_modes(dynamic=False)  # the static fast path (a plain conv) reports the same way
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(2, 3, 4, 4))
    assert layer(torch.randn(2, 3, 5, 5)).shape == (2, 4, 1, 1)  # exactly the kernel size is fine


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 0)), ValueError, "kernel_size"),
    (dict(kernel_size=2.5), TypeError, "kernel_size"),
    (dict(kernel_size=3, stride=0), ValueError, "stride"),
    (dict(kernel_size=3, dilation=0), ValueError, "dilation"),
    (dict(kernel_size=3, padding=-1), ValueError, "padding"),
    (dict(kernel_size=3, padding="full"), ValueError, "padding"),
    (dict(kernel_size=3, num_kernels=2.5), TypeError, "num_kernels"),
    (dict(kernel_size=3, num_kernels="4"), TypeError, "num_kernels"),
    (dict(kernel_size=3, num_kernels=True), TypeError, "num_kernels"),
    (dict(kernel_size=3, num_kernels=0), ValueError, "num_kernels"),
    (dict(kernel_size=3, groups=2.0), TypeError, "groups"),
    (dict(kernel_size=3, reduction="4"), TypeError, "reduction"),
])
def test_bad_conv_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicConv2d(4, 4, **kwargs)
