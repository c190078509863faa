"""BatchNorm folding, torch.export and ONNX export (onnxruntime) of dynamic / PAD / compact models."""

import argparse
import copy

import pytest
import torch
from torch import nn

import padnet
from padnet.io import export_onnx, export_program, run_onnx
from padnet.transforms import compact_, find_conv_bn_pairs
from padnet.layers import CompactDynamicConv2d, DynamicConv2d, MoEFeedForward, pad_layers
from padnet.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def set_masks_(model, kind, ratio=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in pad_layers(model):
        with torch.no_grad():
            layer.scale.phi.fill_(0.2)
        for group in layer.mode_groups():
            shape = group.shape
            if kind == "element":
                mask = (torch.rand(shape, generator=g) < ratio).float()
            elif kind == "channel":
                rows = (torch.rand(shape[0], generator=g) < ratio).float()
                rows[0], rows[-1] = 1.0, 0.0  # both kinds present
                mask = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
            else:
                mask = torch.ones(shape)
            layer.set_mode_mask(group.name, mask)
    return model


def randomize_bn_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------


FOLD_CASES = [(r, k, "resnet10") for r in ("softmax", "sigmoid") for k in ("element", "channel", "ones")]
FOLD_CASES += [("softmax", "channel", "mobilenet_v2"), ("sigmoid", "element", "mobilenet_v2")]


@pytest.mark.parametrize("routing, kind, arch", FOLD_CASES)
def test_fold_bn_matches_unfolded_eval(routing, kind, arch):
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, small_input=True)
    kwargs.update(width=0.25) if arch == "resnet10" else kwargs.update(width_mult=0.25)
    model = create_model(arch, **kwargs)
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(routing=routing), seed=0))
    model = randomize_bn_(set_masks_(model, kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        plain = compact_(copy.deepcopy(model))
        folded = compact_(copy.deepcopy(model), fold_bn=True)
        n_pairs = len(find_conv_bn_pairs(plain))
        assert n_pairs == len(list(pad_layers(model)))  # every dynamic conv is followed by its BN
        assert rel(folded(x), ref) < 1e-5
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert bns == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - n_pairs
    assert padnet.get_state(folded).ops()[-2:] == ["compact", "fold_bn"]
    assert len(padnet.get_state(folded).last("fold_bn").params["pairs"]) == n_pairs


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias_kind", ["none", "static", "dynamic", "mixed"])
def test_fold_bn_shift_placement(routing, bias_kind):
    """The BN shift goes to the static bias; into dynamic biases only for softmax (sum pi = 1)."""
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, padding=1, bias=bias_kind != "none", routing=routing, temperature=0.7)
    set_masks_(nn.Sequential(conv), "element", ratio=0.5)
    if bias_kind != "none":
        bm = {"static": torch.zeros(6), "dynamic": torch.ones(6), "mixed": torch.tensor([1.0, 0, 1, 0, 1, 0])}
        conv.set_mode_mask("bias", bm[bias_kind])
    model = randomize_bn_(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU())).eval()
    x = torch.randn(5, 4, 7, 7)
    with torch.no_grad():
        ref = model(x)
        folded = compact_(copy.deepcopy(model), fold_bn=True)
        assert isinstance(folded[1], nn.Identity)
        assert rel(folded(x), ref) < 1e-5
    layer = folded[0]
    needs_shift = bias_kind == "none" or (routing == "sigmoid" and bias_kind in ("dynamic", "mixed"))
    assert (layer.bias_shift is not None) == needs_shift


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_folded_state_dict_loads_into_a_fresh_fold(routing):
    """A folded checkpoint rebuilds as: same masks -> eval -> compact_(fold_bn=True) -> load_state_dict."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(DynamicConv2d(4, 6, 3, padding=1, routing=routing), nn.BatchNorm2d(6),
                          DynamicConv2d(6, 6, 3, padding=1, bias=True, routing=routing), nn.BatchNorm2d(6))
        return set_masks_(m, "element", ratio=0.5)

    folded = compact_(randomize_bn_(build()).eval(), fold_bn=True)
    fresh = compact_(build().eval(), fold_bn=True)  # default BN statistics: a structural fold only
    fresh.load_state_dict(folded.state_dict(), strict=True)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), folded(x))


def test_fold_bn_refuses_training_mode_and_leaves_model_untouched():
    model = nn.Sequential(DynamicConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        compact_(model, fold_bn=True)
    assert isinstance(model[0], DynamicConv2d) and isinstance(model[1], nn.BatchNorm2d)
    model.eval()
    compact_(model)
    compact_(model, fold_bn=True)  # folding an already compact model
    assert isinstance(model[1], nn.Identity) and isinstance(model[0], CompactDynamicConv2d)


# --------------------------------------------------------------------------------------------
# torch.export and ONNX
# --------------------------------------------------------------------------------------------


def small_conv_model(kind="element", compact=False, fold_bn=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        DynamicConv2d(8, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DynamicConv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        DynamicConv2d(8, 6, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    model = randomize_bn_(set_masks_(model, kind)).eval()
    if compact or fold_bn:
        compact_(model, fold_bn=fold_bn)
    return model


def moe_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), MoEFeedForward(8, 16, num_experts=4, top_k=2), nn.Linear(8, 2))
    set_masks_(model, "element")
    return model.eval()


SUBJECTS = {
    "dynamic": lambda: small_conv_model("ones"),
    "pad_element": lambda: small_conv_model("element"),
    "compact_channel_foldbn": lambda: small_conv_model("channel", fold_bn=True),
    "compact_element": lambda: small_conv_model("element", compact=True),
}


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_torch_export_dynamic_batch(name):
    model = SUBJECTS[name]()
    program = export_program(model, (torch.randn(3, 3, 8, 8),))
    assert isinstance(program, torch.export.ExportedProgram)
    run = program.module()
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-5)
    assert not model.training  # eval restored (it was eval)


def test_torch_export_moe_uses_dense_dispatch():
    model = moe_model()
    aux_before = model[1].aux_loss
    program = export_program(model, (torch.randn(3, 5, 6),))
    assert model[1].aux_loss is aux_before  # bookkeeping restored after tracing
    for batch in (1, 3):
        x = torch.randn(batch, 5, 6)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pad_element", "compact_channel_foldbn", "moe"])
def test_onnx_torchscript_exporter_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model = moe_model() if name == "moe" else SUBJECTS[name]()
    shape = (5, 6) if name == "moe" else (3, 8, 8)
    path = export_onnx(model, (torch.randn(2, *shape),), tmp_path / f"{name}.onnx", exporter="torchscript", opset=17)
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(run_onnx(path, x)[0])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_onnx_dynamo_exporter_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = small_conv_model("channel", compact=True)
    path = export_onnx(model, (torch.randn(3, 3, 8, 8),), tmp_path / "m.onnx", exporter="dynamo", opset=18)
    import onnx

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(run_onnx(path, x)[0]), model(x), rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_options(tmp_path):
    model = small_conv_model("ones")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx", exporter="magic")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def export_cli(argv):
    """Run ``padnet export`` through its own parser (independent of the other verbs)."""
    from padnet.commands import export as export_cmd

    parser = argparse.ArgumentParser(prog="padnet")
    export_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


class TinyNet(nn.Module):
    """A small zoo-registered image model (conv -> bn -> relu blocks) for the CLI round trip."""

    def __init__(self, num_classes=3, in_chans=1, small_input=True):
        super().__init__()
        self.in_chans, self.small_input = in_chans, small_input
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def saved_pad_model(tmp_path_factory):
    from padnet.models import register_model

    register_model("padnet_test_tinynet", TinyNet, overwrite=True)
    model = create_model("padnet_test_tinynet", num_classes=3, in_chans=1)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    randomize_bn_(set_masks_(model, "channel"))
    path = tmp_path_factory.mktemp("cli") / "pad.safetensors"
    padnet.save(model.eval(), path)
    return path


def test_cli_export_torch_export(saved_pad_model, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert export_cli([str(saved_pad_model), "--format", "torch-export", "--output", str(out), "--image-size", "16"]) == 0
    assert out.is_file()
    text = capsys.readouterr().out
    assert "verify batch 1" in text and "verify batch 3" in text


def test_cli_export_onnx_compact_fold_bn(saved_pad_model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    argv = [str(saved_pad_model), "--format", "onnx", "--output", str(out), "--fold-bn", "--exporter", "torchscript",
            "--opset", "17", "--image-size", "16"]
    assert export_cli(argv) == 0
    assert out.is_file() and "FAILED" not in capsys.readouterr().out


def test_cli_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        export_cli([str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "x.onnx")])
