"""The whole pipeline on hand-written models that reproduce common torchvision / timm patterns.

padnet promises to convert *any* model, not only its own zoo. torchvision and
timm are not installable here, so each model below re-creates their building
blocks by hand:

- ``vgg``: Conv-ReLU(inplace=True) stacks, max-pool, Linear head with Dropout
  and ReLU(inplace=True) (torchvision VGG / AlexNet); ``vgg_bn`` the same with
  BatchNorm (torchvision ``vgg11_bn``);
- ``mbv3``: inverted residuals with depthwise 3x3 convs, squeeze-excite with 1x1
  convs + ReLU(inplace) + Hardsigmoid(inplace), Hardswish(inplace)
  (torchvision MobileNetV3);
- ``resnext_timm``: timm-style fused ``BatchNormAct2d`` (a BatchNorm2d subclass
  that also applies its activation), grouped 3x3 convs, residual adds,
  ``SiLU(inplace)``;
- ``effnet``: SE with a Linear bottleneck (``x.mean((2, 3))``), SiLU(inplace),
  depthwise convs, Linear head.

Each runs through dynamize_, a training step (also in channels_last), partition_,
compact_ with and without BatchNorm folding, save/load, ONNX (dynamo) and
torch.export, with outputs compared to the eager PAD model at every stage.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.io.exporters import export_onnx, export_program, run_onnx

pytestmark = pytest.mark.usefixtures("one_thread")



# ---------------------------------------------------------------- building blocks


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused norm + activation: a BatchNorm2d subclass whose forward also applies ``act``."""

    def __init__(self, num_features: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(num_features)
        self.act = act(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExciteConv(nn.Module):
    """torchvision MobileNetV3 SE: avg-pool, 1x1 conv, ReLU(inplace), 1x1 conv, Hardsigmoid(inplace), scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class SqueezeExciteLinear(nn.Module):
    """EfficientNet-style SE with Linear layers on the pooled vector."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, se: str | None,
                 act: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        blocks: list[nn.Module] = [conv_bn_act(cin, hidden, 1, act=act),
                                   conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=act)]
        if se == "conv":
            blocks.append(SqueezeExciteConv(hidden, max(hidden // 4, 2)))
        elif se == "linear":
            blocks.append(SqueezeExciteLinear(hidden, max(hidden // 4, 2)))
        blocks.append(conv_bn_act(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv and timm BatchNormAct2d norms."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = BatchNormAct2d(channels, nn.SiLU)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn2 = BatchNormAct2d(channels, nn.SiLU)
        self.conv3 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return self.act(y + x)


# ---------------------------------------------------------------------- models


def vgg(num_classes: int = 5) -> nn.Module:
    """torchvision VGG without BatchNorm: every conv is followed directly by ReLU(inplace=True)."""

    def conv_relu(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_relu(3, 8), *conv_relu(8, 8), nn.MaxPool2d(2), *conv_relu(8, 16), *conv_relu(16, 16),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(32, num_classes),
    )


def vgg_bn(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        conv_bn_act(3, 8), conv_bn_act(8, 8), nn.MaxPool2d(2),
        conv_bn_act(8, 16), conv_bn_act(16, 16), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(32, num_classes),
    )


def mbv3(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        conv_bn_act(3, 8, stride=2, act=nn.Hardswish),
        InvertedResidual(8, 16, 8, 1, se="conv"),
        InvertedResidual(8, 24, 12, 2, se="conv", act=nn.ReLU),
        conv_bn_act(12, 24, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(24, num_classes),
    )


def resnext_timm(num_classes: int = 5) -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct2d(16))
    return nn.Sequential(stem, ResNeXtBlock(16), ResNeXtBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def effnet(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        conv_bn_act(3, 8, act=nn.SiLU),
        InvertedResidual(8, 16, 8, 1, se="linear", act=nn.SiLU),
        InvertedResidual(8, 16, 16, 2, se="linear", act=nn.SiLU),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, num_classes),
    )


MODELS = {"vgg": vgg, "vgg_bn": vgg_bn, "mbv3": mbv3, "resnext_timm": resnext_timm, "effnet": effnet,
          "mbv3_router_norm": mbv3}
# PadConfig options per case (default: PadConfig defaults); "mbv3_router_norm" runs every check with a BatchNorm
# in each dynamic conv's router (the vision recipes' default)
PAD_OPTIONS = {"mbv3_router_norm": {"conv": {"router_norm": "batch"}}}

# Regressions covered by the zoo: "vgg" and "mbv3" put an in-place activation right after a converted conv
# (training used to crash, issue 14 item 1); "resnext_timm" has fused BatchNorm + activation modules that
# fold_bn used to replace by Identity, dropping the activation (issue 14 item 2).


def _case(name: str):
    return pytest.param(name, id=name)


def _data(seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _pad_config(name: str) -> padnet.PadConfig:
    return padnet.PadConfig.from_dict({"version": 2, "seed": 0, **PAD_OPTIONS.get(name, {})})


def _pad_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    padnet.dynamize_(model, _pad_config(name))
    assert any(True for _ in __import__("padnet.layers.modes", fromlist=["pad_layers"]).pad_layers(model))
    return model


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    return float(loss.detach())


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """One training-mode forward (seeded) and the loss with every trainable parameter's gradient."""
    model.train()
    torch.manual_seed(1)
    loss = F.cross_entropy(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                              allow_unused=True)


def _assert_same_step(a: tuple, b: tuple, loss_tol: float, grad_rtol: float, grad_atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=loss_tol, atol=1e-6)
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=grad_rtol, atol=grad_atol)


def _partitioned(name: str) -> tuple[nn.Module, torch.Tensor]:
    model = _pad_model(name)
    x, y = _data()
    _train_step(model, x, y)
    report = padnet.partition_(model, [(x, y)], F.cross_entropy, ratio=0.5, criterion="taylor", iterations=1)
    assert report.to_dict()["ratio"] == pytest.approx(0.5, abs=0.05)
    return model.eval(), x


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_dynamize_and_train_step(name):
    model = _pad_model(name)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    assert torch.isfinite(torch.tensor(_train_step(model, x, y)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_train_step_channels_last(name):
    """channels_last model (converted before dynamize_, as torchvision's reference scripts do) and inputs."""
    torch.manual_seed(0)
    model = MODELS[name]().to(memory_format=torch.channels_last)
    padnet.dynamize_(model, _pad_config(name))
    ref = _pad_model(name)
    x, y = _data()
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref(x), rtol=1e-4, atol=1e-5)
    _train_step(model, x.to(memory_format=torch.channels_last), y)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_partitioned_model_to_channels_last_and_cached_inference(name):
    """After dynamize_ + partition: ``.to(memory_format=channels_last)`` works on the 5-D kernels, and the
    cached inference plan (no autograd) gives the autograd forward's outputs, before and after an update."""
    model, x = _partitioned(name)
    with torch.enable_grad():
        ref = model(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # plan reused
    model.to(memory_format=torch.channels_last)  # invalidates the plans (new storage)
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)
        for p in model.parameters():
            p.mul_(1.01)  # optimizer-like in-place update
        cached = model(x)
    with torch.enable_grad():
        torch.testing.assert_close(cached, model(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_partitioned_training_matches_the_literal_formula(name):
    """After partition (element masks): a training step through the element-mask training path
    (``backend="auto"``: masked factors formed in workspaces, folded under softmax routing) gives the loss and
    every parameter gradient of the literal formula (explicit ``"weight"`` backend, combined factors)."""
    from padnet.layers.modes import pad_layers

    model, x = _partitioned(name)
    _, y = _data()
    literal = copy.deepcopy(model)
    for _, layer in pad_layers(literal):
        if getattr(layer, "backend", None) == "auto":
            layer.backend = "weight"
    _assert_same_step(_loss_and_grads(model, x, y), _loss_and_grads(literal, x, y), 1e-5, 1e-4, 1e-5)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_batch_one_inference_matches_the_autograd_forward(name):
    """The batch-1 deploy path (eval, no autograd) of the partitioned model and of its compact form gives,
    sample by sample, the outputs of the general (autograd) forward: in-place activations, fused
    norm+act, SE blocks and depthwise convs around the layers."""
    model, x = _partitioned(name)
    compact = padnet.compact_(copy.deepcopy(model)).eval()
    for m in (model, compact):
        for i in range(3):
            xi = x[i : i + 1]
            with torch.enable_grad():
                ref = m(xi).detach()
            with torch.no_grad():
                torch.testing.assert_close(m(xi), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_partitioned_training_with_the_compiled_folding_kernels(name, monkeypatch):
    """The element-mask training step with the one-pass C++ folding kernels and, in the layers that run the
    tiled conv, the compiled factor GEMMs (``PADNET_FUSED=1``) gives the loss and every gradient of the
    pure-PyTorch path (``PADNET_FUSED=0``, the suite's default)."""
    from padnet.ops import fused
    from padnet.ops.masked_factors import ElementFactors, _compiled_folding

    model, x = _partitioned(name)
    _, y = _data()
    passes = []
    real_pass = ElementFactors.grad_pass
    monkeypatch.setattr(ElementFactors, "grad_pass", lambda self, *a: passes.append(1) or real_pass(self, *a))
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("PADNET_FUSED", mode)
        results.append(_loss_and_grads(copy.deepcopy(model), x, y))
    assert fused.load_fused() is not None, f"the C++ kernels did not build: {fused._FAILED}"
    probe = torch.zeros(2, 3)
    assert _compiled_folding(probe[None], probe, probe) is not None  # so the "1" run used them
    if name != "resnext_timm":  # (its grouped layers run the grouped-conv backend, not the tiled conv)
        assert passes, "no element layer ran the compiled factor GEMMs"
    _assert_same_step(*results, 1e-6, 1e-5, 1e-6)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_partition_and_compact(name):
    model, x = _partitioned(name)
    with torch.no_grad():
        ref = model(x)
        compact = padnet.compact_(copy.deepcopy(model)).eval()
        torch.testing.assert_close(compact(x), ref, rtol=1e-4, atol=1e-5)
    assert padnet.count_parameters(compact).total < padnet.count_parameters(model).total


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_compact_fold_bn_keeps_outputs(name):
    """Folding must never drop what a fused norm+act module does (or must refuse clearly)."""
    model, x = _partitioned(name)
    with torch.no_grad():
        ref = model(x)
        folded = padnet.compact_(copy.deepcopy(model), fold_bn=True).eval()
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_save_load_round_trip(name, tmp_path):
    model, x = _partitioned(name)
    for form in ("pad", "compact"):
        m = model if form == "pad" else padnet.compact_(copy.deepcopy(model)).eval()
        path = padnet.save(m, tmp_path / f"{name}-{form}.safetensors")
        torch.manual_seed(123)  # a fresh base model with other weights
        loaded = padnet.load(path, model=MODELS[name]()).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x)), form
        assert loaded.state_dict().keys() == m.state_dict().keys()


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_onnx_and_torch_export(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _partitioned(name)
    compact = padnet.compact_(copy.deepcopy(model)).eval()
    with torch.no_grad():
        ref = compact(x[:3])
    program = export_program(compact, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:3]), ref, rtol=1e-4, atol=1e-5)
    # the TorchScript exporter for every pattern (about 1 s each); the dynamo exporter (the CLI default, 25-30 s
    # per model on a loaded 2-core machine) is the same torch.export graph checked above, run once on effnet
    exporter = "dynamo" if name == "effnet" else "torchscript"
    path = export_onnx(compact, (x[:2],), tmp_path / f"{name}.onnx", exporter=exporter)
    got = torch.as_tensor(run_onnx(path, x[:3])[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choice", ["fused", "bmm"])
@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_inference_with_the_fused_kernel_and_tuned_choices(name, granularity, choice, monkeypatch, tmp_path):
    """With the compiled kernels on and the tuner choosing ``choice`` (the fused kernel, or the tiled GEMM
    with its compiled batch-1 call) wherever it is a candidate (batch 1 and batched, PAD and compact, element
    and channel masks), the outputs equal the pure-PyTorch rule's around in-place activations, fused
    norm+act, SE blocks and depthwise convs. (These layers have too few static rows for the padded plain
    conv of a channel split: tests/test_backends.py covers that.)"""
    from padnet.ops import autotune, backend_selection, fused

    model = _pad_model(name)
    x, y = _data()
    _train_step(model, x, y)
    padnet.partition_(model, [(x, y)], F.cross_entropy, ratio=0.3, criterion="taylor", iterations=1,
                      granularity=granularity)
    model.eval()
    compact = padnet.compact_(copy.deepcopy(model)).eval()
    with torch.no_grad():  # the reference: PADNET_FUSED=0 (the suite's default), no tuning
        refs = [(m(x[:1]), m(x[:3])) for m in (model, compact)]
    monkeypatch.setenv("PADNET_FUSED", "1")
    monkeypatch.setenv("PADNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PADNET_AUTOTUNE", "1")
    autotune.set_autotune(None)
    autotune.clear_autotune_cache()
    backend_selection.clear_choices()
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        choice if choice in candidates else candidates[0])
    calls = []
    real = fused.fused_dynamic_conv2d
    monkeypatch.setattr(fused, "fused_dynamic_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    from padnet.layers import dynamic_conv as layer_module

    compiled = []  # the compiled batch-1 calls (router + mixing + conv or fused kernel in one C++ call)
    real_routed = layer_module.routed_call

    def spy_routed(*args, **kwargs):
        found = real_routed(*args, **kwargs)
        return None if found is None else ((lambda *a: compiled.append(1) or found[0](*a)), found[1])

    monkeypatch.setattr(layer_module, "routed_call", spy_routed)
    try:
        with torch.no_grad():
            for m, (ref1, ref3) in zip((copy.deepcopy(model), copy.deepcopy(compact)), refs):
                torch.testing.assert_close(m(x[:1]), ref1, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(m(x[:3]), ref3, rtol=1e-4, atol=1e-5)
    finally:
        autotune.clear_autotune_cache()
        backend_selection.clear_choices()
    assert bool(calls) == (choice == "fused"), "the fused kernel ran where it was not chosen, or never"
    if granularity == "element":  # (channel plans run their batch-1 split in Python: docs/benchmarks.md)
        assert compiled, "the compiled batch-1 call never ran"
