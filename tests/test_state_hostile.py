"""Damaged and hostile padnet files, and norm layers fold_bn must not touch (issue 14 items 2, 10, 11, 12)."""

import json
import tracemalloc
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import padnet
from padnet.layers import DynamicConv2d
from padnet.models import create_model
from padnet.transforms import UnfoldedNormWarning, is_plain_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def small_pad(width=0.1):
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=3, in_chans=1, small_input=True, width=width).eval()
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=2), seed=0))
    padnet.partition_(model, None, None, ratio=0.3, criterion="magnitude", iterations=1)
    return model


def rewrite(src, dst, edit_meta=None, edit_tensors=None):
    """Copy a padnet file with its header / tensors changed (what an attacker or a bad disk does)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["padnet"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"padnet": json.dumps(meta)})
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "pad.safetensors"
    padnet.save(small_pad(), path)
    return path


def test_wider_spec_in_header_is_refused_before_allocating(saved, tmp_path):
    """issue 14 item 10: raising ``width`` in the header must not make load build a huge model."""
    def widen(meta):
        meta["state"]["model_spec"]["kwargs"]["width"] = 64.0  # ~4.5 G parameters if built

    bad = rewrite(saved, tmp_path / "wide.safetensors", widen)
    tracemalloc.start()
    try:
        with pytest.raises(padnet.CheckpointError, match="does not fit the tensors"):
            padnet.load(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_huge_num_kernels_in_header_is_refused_before_allocating(saved, tmp_path):
    """A sibling of item 10: K = 10^6 in the recorded PadConfig must not be replayed."""
    def many_kernels(meta):
        meta["state"]["steps"][0]["params"]["config"]["conv"]["num_kernels"] = 1_000_000

    bad = rewrite(saved, tmp_path / "k.safetensors", many_kernels)
    tracemalloc.start()
    try:
        with pytest.raises(padnet.CheckpointError, match="does not fit the tensors"):
            padnet.load(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_spec_shape_mismatch_is_named(saved, tmp_path):
    def more_classes(meta):
        meta["state"]["model_spec"]["kwargs"]["num_classes"] = 7

    bad = rewrite(saved, tmp_path / "classes.safetensors", more_classes)
    with pytest.raises(padnet.CheckpointError, match=r"'fc.weight' has shape \(3, .*\) in the file but"):
        padnet.load(bad)


def test_unbuildable_spec_is_a_checkpoint_error(saved, tmp_path):
    def bogus(meta):
        meta["state"]["model_spec"] = {"name": "resnet10", "kwargs": {"depth": 3}}

    with pytest.raises(padnet.CheckpointError, match="cannot be built"):
        padnet.load(rewrite(saved, tmp_path / "b.safetensors", bogus))


@pytest.mark.parametrize("value", [7.0, 0.5, float("nan")])
def test_mask_values_other_than_0_1_are_rejected(saved, tmp_path, value):
    """issue 14 item 11: a loaded mode mask holding 7.0 is rejected like set_mode_mask rejects it."""
    def poison(tensors):
        key = "layer1.0.conv1.mode_mask"
        assert key in tensors
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    bad = rewrite(saved, tmp_path / "mask.safetensors", edit_tensors=poison)
    with pytest.raises(padnet.CheckpointError, match="mode mask 'layer1.0.conv1.mode_mask'"):
        padnet.load(bad)


def test_mask_values_in_a_compact_file_are_rejected(tmp_path):
    model = small_pad()
    padnet.compact_(model)
    path = padnet.save(model, tmp_path / "c.safetensors")

    def poison(meta):  # a compact file's masks are bool; a float one with 7.0 must not pass as True
        pass

    def poison_tensors(tensors):
        key = "layer1.0.conv1.weight.mask"
        tensors[key] = tensors[key].float() * 7.0

    bad = rewrite(path, tmp_path / "cbad.safetensors", poison, poison_tensors)
    with pytest.raises(padnet.CheckpointError, match="mask"):
        padnet.load(bad)


@pytest.mark.parametrize("dtype, message", [
    ("torch.bogus", "dtype 'torch.bogus' is not one of"),
    (["torch.float32"], "is not one of"),
    ("torch.float16", "does not match the stored parameters"),
    ("float32", "is not one of"),
])
def test_bad_dtype_in_metadata(saved, tmp_path, dtype, message):
    """issue 14 item 12: dtype "torch.bogus" / "torch.float16" / a JSON list in the file header."""
    def set_dtype(meta):
        meta["dtype"] = dtype

    with pytest.raises(padnet.CheckpointError, match=message):
        padnet.load(rewrite(saved, tmp_path / "d.safetensors", set_dtype))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(temperatures={"layer1.0.conv1": float("inf")}), "temperatures"),
    (lambda m: m.update(temperatures={"fc": 1.0}), "without one"),
    (lambda m: m.update(temperatures=[1.0]), "temperatures"),
    (lambda m: m.update(mask_keys=["x"]), "mask_keys"),
    (lambda m: m.update(extra="x"), "extra"),
    (lambda m: m.update(format_version=True), "format version"),
    (lambda m: m.update(format_version=99), "format version"),
    (lambda m: m["state"]["steps"].append({"op": "exec", "params": {}}), "unknown op 'exec'"),
    (lambda m: m["state"]["steps"][0]["params"].update(config={"conv": {"num_kernels": "4"}}), "num_kernels"),
    (lambda m: m["state"].update(model_spec={"name": 3}), "model spec"),
    (lambda m: m.clear(), "format version"),
])
def test_bad_metadata_fields_are_named(saved, tmp_path, edit, message):
    with pytest.raises(padnet.CheckpointError, match=message):
        padnet.load(rewrite(saved, tmp_path / "m.safetensors", edit))


def test_replayed_sites_must_match_the_record(saved, tmp_path):
    def other_sites(meta):
        meta["state"]["steps"][0]["params"]["sites"] = ["layer1.0.conv1"]

    with pytest.raises(padnet.CheckpointError, match="replaying dynamize converted"):
        padnet.load(rewrite(saved, tmp_path / "s.safetensors", other_sites))


# ------------------------------------------------------------------------------ fold_bn (issue 14 item 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + activation in one module, as model libraries ship it."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class HardBN(nn.BatchNorm2d):
    """Overrides forward without submodules (e.g. a fused op): not provably plain either."""

    def forward(self, x):
        return torch.nn.functional.hardtanh(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    """A subclass that only renames: folded like nn.BatchNorm2d."""


def norm_act_net(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), norm(8),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g))
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return net.eval()


@pytest.mark.parametrize("norm", [BatchNormAct2d, HardBN])
def test_fold_bn_keeps_fused_norm_act_modules(norm, tmp_path):
    net = norm_act_net(norm)
    padnet.dynamize_(net, padnet.PadConfig(target_types=["conv2d"], seed=0))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = net(x)
    with pytest.warns(UnfoldedNormWarning, match=r"'4', '" + norm.__name__):
        padnet.compact_(net, fold_bn=True)
    assert type(net[4]) is norm  # kept, with whatever else it does
    assert isinstance(net[1], nn.Identity) and isinstance(net[6], nn.Identity)  # plain BNs folded
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    loaded = padnet.load(padnet.save(net, tmp_path / "n.safetensors"), model=norm_act_net(norm)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_plain_batchnorm_detection():
    assert is_plain_batchnorm(nn.BatchNorm2d(4))
    assert is_plain_batchnorm(PlainSubclass(4))
    assert not is_plain_batchnorm(BatchNormAct2d(4))
    assert not is_plain_batchnorm(HardBN(4))
    assert not is_plain_batchnorm(nn.BatchNorm1d(4))
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda *a: None)
    assert not is_plain_batchnorm(hooked)
    net = norm_act_net(PlainSubclass)
    padnet.dynamize_(net, padnet.PadConfig(target_types=["conv2d"], seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        padnet.compact_(net, fold_bn=True)
    assert isinstance(net[4], nn.Identity)
    assert isinstance(net[3], padnet.layers.CompactDynamicConv2d)
    assert not isinstance(net[3], DynamicConv2d)
