"""Files written by padnet 0.1.0 (before the transform record) still load, with exact outputs.

The fixtures in ``tests/fixtures/`` were written by ``make_v0_1_fixtures.py``
with padnet 0.1.0 (commit 21627cd); their headers hold the flat v1
``pad_config`` and a ``compact`` flag instead of a ``state`` record.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import padnet
from padnet.layers import is_compact_layer, pad_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_outputs(y, expected_y):
    """Equal to float32 rounding. The expected outputs were computed on an AVX-512 Intel CPU; other CPUs' conv
    kernels round differently (max 4.5e-8 on an AMD Zen 3, for outputs of size 0.2), while one wrongly loaded
    tensor moves the outputs by orders of magnitude more than the 1e-6 allowed here."""
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-6)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "v0_1_expected.safetensors")


def test_v0_1_pad_file_loads_exactly(expected):
    model = padnet.load(FIXTURES / "v0_1_resnet10_pad.safetensors").eval()
    layers = dict(pad_layers(model))
    assert len(layers) == 11
    assert all(layer.mode_groups()[0].num_factors == 2 for layer in layers.values())
    with torch.no_grad():
        y = model(expected["x"])
    assert_same_outputs(y, expected["y_pad"])


def test_v0_1_compact_file_loads_exactly(expected):
    model = padnet.load(FIXTURES / "v0_1_resnet10_compact.safetensors").eval()
    assert not list(pad_layers(model))
    assert sum(is_compact_layer(m) for m in model.modules()) == 11
    with torch.no_grad():
        y = model(expected["x"])
    assert_same_outputs(y, expected["y_compact"])


def test_v0_1_bert_moe_compact_file_loads_exactly(expected):
    model = padnet.load(FIXTURES / "v0_1_tiny_bert_moe_compact.safetensors").eval()
    assert sum(is_compact_layer(m) for m in model.modules()) == 1
    with torch.no_grad():
        y = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    assert_same_outputs(y, expected["y_bert_compact"])


def test_v0_1_compact_folded_file_now_loads_exactly():
    """padnet 0.1 wrote compact_(fold_bn=True) files it could not load (missing BatchNorm keys);
    the folded BatchNorms are recognised by their absence from the file."""
    expected = load_file(FIXTURES / "v0_1_folded_expected.safetensors")
    model = padnet.load(FIXTURES / "v0_1_resnet10_compact_folded.safetensors").eval()
    assert isinstance(model.layer1[0].bn1, torch.nn.Identity)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)  # after the (static) stem: never folded
    assert padnet.get_state(model).ops() == ["dynamize", "compact", "fold_bn"]
    with torch.no_grad():
        assert_same_outputs(model(expected["x"]), expected["y"])
