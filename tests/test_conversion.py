"""The conversion registry: structural matchers, swap_module, deploy forms, PadConfig v2."""

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import CompactDynamicConv2d, DynamicConv2d, pad_layers
from padnet.layers.moe import MoEFeedForward
from padnet.transforms import conversion
from padnet.transforms.config import PadConfig, migrate_v1
from padnet.transforms.conversion import (
    Converter, deploy_form, find_sites, moe_from_linears, register_converter, register_deploy_form, swap_module,
    unregister_converter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class GatedFFN(nn.Module):
    """A third-party FFN shape no built-in converter knows: ``down(act(up(x)))`` under custom names."""

    def __init__(self, d=6, h=12):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.mlp = GatedFFN()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _match_gated(name, module):
    return GATED.site(name) if isinstance(module, GatedFFN) else None


def _convert_gated(model, site, cfg):
    ffn = model.get_submodule(site.name)
    swap_module(model, site.name, moe_from_linears(ffn.up, ffn.down, ffn.act, cfg))


GATED = Converter("test_gated_ffn", "ffn", _match_gated, _convert_gated)


@pytest.fixture
def gated_registered():
    register_converter(GATED, priority=5)
    yield
    unregister_converter(GATED.name)


def test_registering_a_converter_is_the_one_place_a_new_family_needs(gated_registered):
    assert "test_gated_ffn" in conversion.converter_names()
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(3, 6)
    ref = model(x)
    assert [s.name for s in find_sites(model)] == ["0.mlp", "1.mlp"]
    cfg = PadConfig(moe=padnet.MoEConfig(num_experts=2, top_k=2, noise_std=0.0))
    padnet.dynamize_(model, cfg)
    assert [n for n, _ in pad_layers(model)] == ["0.mlp", "1.mlp"]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # upcycled, no noise: same function
    padnet.compact_(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class FunctionalFFN(nn.Module):
    """An FFN no registered converter knows: the activation is a function call, not a child module
    (the structural ``hf_ffn`` matcher needs an activation module; ``GatedFFN`` it now recognises)."""

    def __init__(self, d=6, h=12):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class FunctionalBlock(Block):
    def __init__(self):
        super().__init__()
        self.mlp = FunctionalFFN()


def test_unregistered_family_is_not_converted_and_errors_name_the_registry():
    model = nn.Sequential(FunctionalBlock())
    assert find_sites(model) == []
    with pytest.raises(ValueError, match="cannot convert"):
        padnet.dynamize_(model, PadConfig(target_modules=["mlp"]))
    with pytest.raises(KeyError, match="registered converters: .*conv2d"):
        unregister_converter("nope")
    with pytest.raises(KeyError, match="unknown converter 'nope'; registered converters: .*conv2d"):
        conversion.get_converter("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_converter(Converter("conv2d", "conv2d", lambda n, m: None, lambda *a: None))
    with pytest.raises(ValueError, match="target_type"):
        Converter("x", "lstm", lambda n, m: None, lambda *a: None)


def test_converter_priority_decides_between_matchers():
    seen = []

    def match_all_convs(name, module):
        return eager.site(name) if type(module) is nn.Conv2d else None

    def convert(model, site, cfg):
        seen.append(site.name)

    eager = Converter("test_eager_conv", "conv2d", match_all_convs, convert)
    register_converter(eager, priority=100)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        assert {s.converter for s in find_sites(model)} == {"test_eager_conv"}
        padnet.dynamize_(model, PadConfig(target_types=["conv2d"]))
        assert seen == ["0", "1"] and not list(pad_layers(model))
    finally:
        unregister_converter("test_eager_conv")
    assert {s.converter for s in find_sites(nn.Sequential(nn.Conv2d(3, 4, 3)))} == {"conv2d"}


def test_swap_module_attributes_and_containers():
    model = nn.Sequential(nn.Linear(2, 2), nn.ModuleDict({"a": nn.ReLU()}), nn.ModuleList([nn.Tanh()])).eval()
    old = swap_module(model, "1.a", nn.GELU())
    assert isinstance(old, nn.ReLU) and isinstance(model[1]["a"], nn.GELU)
    swap_module(model, "2.0", nn.Sigmoid())
    assert isinstance(model[2][0], nn.Sigmoid)
    new = nn.Linear(2, 2).train()
    swap_module(model, "0", new)
    assert model[0] is new and not new.training  # takes the old module's mode
    with pytest.raises(KeyError, match="not a submodule"):
        swap_module(model, "9", nn.ReLU())
    with pytest.raises(KeyError, match="not a submodule"):
        swap_module(model, "x.y", nn.ReLU())
    with pytest.raises(ValueError, match="root"):
        swap_module(model, "", nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        swap_module(model, "0", torch.ones(1))


def test_deploy_forms_come_from_the_registry():
    conv = DynamicConv2d.from_conv(nn.Conv2d(3, 4, 3), num_kernels=2)
    assert isinstance(deploy_form(conv), CompactDynamicConv2d)

    class MyDynamicConv(DynamicConv2d):
        pass

    sub = MyDynamicConv(3, 4, 3, num_kernels=2)
    assert isinstance(deploy_form(sub), CompactDynamicConv2d)  # nearest registered base
    built = []
    register_deploy_form(MyDynamicConv, lambda layer: built.append(layer) or CompactDynamicConv2d(layer))
    try:
        deploy_form(sub)
        assert built == [sub]
        with pytest.raises(ValueError, match="already registered"):
            register_deploy_form(MyDynamicConv, CompactDynamicConv2d)
    finally:
        conversion._DEPLOY_FORMS.pop(MyDynamicConv)
    with pytest.raises(TypeError, match="no deploy form registered for Linear"):
        deploy_form(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="PAD layer"):
        padnet.transforms.compact_layer(nn.Linear(2, 2))


def test_default_targets_are_structural_stem_and_conv_output_head():
    class ConvHeadNet(nn.Module):
        """A fully convolutional classifier whose head is *not* named fc/classifier/head."""

        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 8, 3, padding=1)
            self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.out = nn.Sequential(nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.out(self.mid(self.first(x)))

    model = padnet.dynamize_(ConvHeadNet())
    assert [n for n, _ in pad_layers(model)] == ["mid.0", "mid.2"]
    # a conv named like a classifier but followed by a Linear is an ordinary conv
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Flatten(), nn.LazyLinear(2))
    net.classifier = nn.Conv2d(4, 4, 1)  # registered last: it is the output head
    assert [n for n, _ in pad_layers(padnet.dynamize_(net))] == ["1.0"]


def test_bert_converter_is_registered_by_the_bert_integration():
    pytest.importorskip("transformers")
    from padnet.models import bert

    assert conversion.converter_names()[0] == "bert_ffn"
    model = bert.tiny_bert_classifier(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    sites = find_sites(model)
    assert [(s.name, s.converter) for s in sites if s.target_type == "ffn"] == [
        ("encoder.encoder.layer.0.intermediate", "bert_ffn")]
    padnet.dynamize_(model, PadConfig(moe=padnet.MoEConfig(num_experts=2, top_k=1), seed=0))
    layer = model.encoder.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEFeedForward) and isinstance(layer.output.dense, nn.Identity)


def test_pad_config_v2_v1_migration_and_overrides():
    v1 = {"target_modules": None, "target_types": None, "exclude_modules": None, "num_kernels": 2, "reduction": 4,
          "temperature": 1.0, "routing": "sigmoid", "scale": "none", "dynamic_ratio": 0.3, "init": "inherit",
          "noise_std": 0.05, "backend": "auto", "num_experts": 3, "top_k": 1, "moe_init": "split",
          "aux_loss_coef": 0.0, "seed": 4, "version": 1}
    cfg = PadConfig.from_dict(v1)
    assert cfg.conv == padnet.DynamicConvConfig(num_kernels=2, routing="sigmoid", scale="none", noise_std=0.05)
    assert cfg.moe == padnet.MoEConfig(num_experts=3, top_k=1, init="split", noise_std=0.05, scale="none",
                                       aux_loss_coef=0.0)
    assert cfg.seed == 4 and cfg.version == 2
    assert PadConfig.from_dict(cfg.to_dict()) == cfg
    assert migrate_v1({"num_kernels": 3})["conv"] == {"num_kernels": 3}
    with pytest.raises(ValueError, match="unknown PadConfig \\(version 1\\) keys \\['kernels'\\]"):
        PadConfig.from_dict({"kernels": 3, "version": 1})
    # a training config's pad_config overrides: flat v1 names, dotted or nested v2 keys
    base = PadConfig(seed=0)
    assert base.updated({"scale": "none"}).conv.scale == "none"
    assert base.updated({"scale": "none"}).moe.scale == "none"
    assert base.updated({"top_k": 1}).moe.top_k == 1
    assert base.updated({"conv.num_kernels": 6}).conv.num_kernels == 6
    assert base.updated({"moe": {"num_experts": 8}}).moe.num_experts == 8
    assert base.updated({"target_types": ["ffn"]}).target_types == ["ffn"]
    with pytest.raises(ValueError, match="not a PadConfig option"):
        base.updated({"dynamic_ratio": 0.3})
    with pytest.raises(ValueError, match="unknown pad_config keys \\['kernels'\\]"):
        base.updated({"kernels": 2})
    # flat shorthand (the padnet 0.1 spelling) goes to the blocks
    assert PadConfig(num_kernels=4, top_k=1, noise_std=0.0) == PadConfig(
        conv=padnet.DynamicConvConfig(num_kernels=4, noise_std=0.0), moe=padnet.MoEConfig(top_k=1, noise_std=0.0))
    assert PadConfig(conv=padnet.DynamicConvConfig(routing="sigmoid"), num_kernels=2).conv.routing == "sigmoid"
    with pytest.raises(ValueError, match="not a PadConfig option"):
        PadConfig(num_kernels=4, dynamic_ratio=0.3)
    with pytest.raises(ValueError, match="unknown pad_config keys"):
        PadConfig(kernels=4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        PadConfig(**{"conv.num_kernels": 4})


@pytest.mark.parametrize("make, error, message", [
    (lambda: padnet.DynamicConvConfig(num_kernels="4"), TypeError, "num_kernels"),
    (lambda: padnet.DynamicConvConfig(num_kernels=2.5), TypeError, "num_kernels"),
    (lambda: padnet.DynamicConvConfig(temperature="1"), TypeError, "temperature"),
    (lambda: padnet.DynamicConvConfig(noise_std=float("nan")), ValueError, "noise_std"),
    (lambda: padnet.DynamicConvConfig(routing="relu"), ValueError, "routing"),
    (lambda: padnet.DynamicConvConfig(backend="cuda"), ValueError, "backend"),
    (lambda: padnet.MoEConfig(noise_std=float("inf")), ValueError, "noise_std"),
    (lambda: padnet.MoEConfig(top_k=True), TypeError, "top_k"),
    (lambda: PadConfig(target_modules="(unclosed"), ValueError, "regular expression"),
    (lambda: PadConfig(target_modules=[3]), TypeError, "target_modules"),
    (lambda: PadConfig(conv={"num_kernels": 2}), TypeError, "DynamicConvConfig"),
    (lambda: PadConfig(seed="0"), TypeError, "seed"),
])
def test_config_values_are_checked_with_named_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_converter_registry_is_a_registry_with_priorities():
    from padnet.registry import Registry

    assert isinstance(conversion.CONVERTERS, Registry) and "conv2d" in conversion.CONVERTERS
    before = conversion.converter_names()
    a = Converter("test_prio_a", "conv2d", lambda n, m: None, lambda *a: None)
    b = Converter("test_prio_b", "conv2d", lambda n, m: None, lambda *a: None)
    try:
        register_converter(a, priority=50)
        register_converter(b, priority=50)
        assert conversion.converter_names()[:2] == ["test_prio_a", "test_prio_b"]  # tie: registration order
        assert register_converter(a, priority=50) is a  # the same converter again: no change
        assert conversion.converter_names()[:2] == ["test_prio_a", "test_prio_b"]
        with pytest.raises(ValueError, match="already registered"):
            register_converter(a, priority=60)  # a new priority needs overwrite
        register_converter(a, priority=40, overwrite=True)
        assert conversion.converter_names().index("test_prio_b") < conversion.converter_names().index("test_prio_a")
        register_converter(a, priority=50, overwrite=True)
        register_converter(b, priority=50, overwrite=True)  # overwrite re-registers: b moves behind a
        assert conversion.converter_names()[:2] == ["test_prio_a", "test_prio_b"]
        with pytest.raises(TypeError, match="expects a Converter"):
            register_converter("conv2d")
        with pytest.raises(TypeError, match="priority must be an int"):
            register_converter(b, priority=1.5, overwrite=True)
    finally:
        for name in ("test_prio_a", "test_prio_b"):
            if name in conversion.CONVERTERS:
                unregister_converter(name)
    assert conversion.converter_names() == before
