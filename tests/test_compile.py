"""torch.compile: PAD layers and their deploy forms compile as one graph (no graph breaks), inference and training.

``fullgraph=True`` makes any graph break an error. The ``aot_eager`` backend
(dynamo capture + AOT autograd, no code generation) keeps these fast; inductor
end to end (C++ code generation: minutes on a busy 2-core machine) is exercised
by ``benchmarks/bench_compile.py``, which also checks its numbers.
"""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import padnet
from padnet.layers import CompactDynamicConv2d, DynamicConv2d, pad_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def masked_layer(kind: str, bias: bool = True) -> DynamicConv2d:
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 8, 3, padding=1, bias=bias)
    shape = layer.mode_mask.shape
    g = torch.Generator().manual_seed(1)
    if kind == "element":
        layer.set_mode_mask("weight", (torch.rand(shape, generator=g) < 0.3).float())
    elif kind == "channel":
        layer.set_mode_mask("weight", (torch.arange(8) % 3 == 0).float().view(-1, 1, 1, 1).expand(shape).clone())
    elif kind == "zeros":
        layer.set_all_modes(dynamic=False)
    return layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["ones", "element", "channel", "zeros"])
@pytest.mark.parametrize("form", ["pad", "compact"])
def test_layer_compiles_without_graph_breaks(kind, form):
    layer = masked_layer(kind)
    if form == "compact":
        layer = CompactDynamicConv2d(layer.eval())
    x = torch.randn(3, 6, 7, 7)
    layer.eval()
    with torch.no_grad():
        ref = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
        explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["ones", "element", "channel"])
def test_training_step_compiles_and_matches_eager(kind):
    layer = masked_layer(kind).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 6, 7, 7)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    loss = torch.relu_(compiled(x)).square().mean()  # an in-place activation after the layer, too
    loss.backward()
    ref = torch.relu(twin(x)).square().mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dynamized_model_train_step_and_compact_inference_compile():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    padnet.dynamize_(model)
    for i, (_, layer) in enumerate(pad_layers(model)):
        shape = layer.mode_mask.shape
        layer.set_mode_mask("weight", (torch.rand(shape, generator=torch.Generator().manual_seed(i)) < 0.3).float())
    x = torch.randn(4, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x).logsumexp(1).mean()
    loss.backward()
    opt.step()
    model.eval()
    padnet.compact_(model)
    with torch.no_grad():
        ref = model(x)
        explanation = torch._dynamo.explain(model)(x)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), ref,
                                   rtol=1e-5, atol=1e-5)
    assert explanation.graph_break_count == 0

