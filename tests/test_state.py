"""The transform record (PadState): save and load after every transform and every CLI combination.

Each case builds a small model, applies a sequence of transforms, checking
after *every* step that ``padnet.save`` -> ``padnet.load`` gives a model with
the same transform record, the same state dict and bit-identical eval outputs.
"""

import copy
import os
import stat

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import is_compact_layer, pad_layers
from padnet.models import create_model
from padnet.transforms import PadState, get_state
from padnet.transforms.record import STATE_ATTRIBUTE

pytestmark = pytest.mark.usefixtures("one_thread")


def magnitude(model, ratio):
    padnet.partition_(model, None, None, ratio=ratio, criterion="magnitude", iterations=1)


def random_stats_(model):
    """Non-trivial BatchNorm statistics (a fresh BN folds to almost the identity)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def resnet():
    torch.manual_seed(0)
    return random_stats_(create_model("resnet10", num_classes=3, in_chans=1, small_input=True, width=0.1)).eval()


def mobilenet():
    torch.manual_seed(0)
    return random_stats_(create_model("mobilenet_v2", num_classes=3, width_mult=0.1, small_input=True)).eval()



def tiny_bert():
    pytest.importorskip("transformers")
    from padnet.models import bert

    torch.manual_seed(0)
    return bert.tiny_bert_classifier(num_labels=2, vocab_size=30, hidden_size=16, num_layers=2, num_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, dropout=0.0).eval()


IMAGE = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
IMAGE3 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(2))

CONV_CFG = padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=2), seed=0)
SIGMOID_CFG = padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=3, routing="sigmoid"), seed=1)
MOE_CFG = padnet.PadConfig(moe=padnet.MoEConfig(num_experts=2, top_k=1), seed=0)

# (model factory, input, steps): every sequence padnet train / partition / export can produce
CASES = {
    "resnet:dynamize": (resnet, (IMAGE,), [("dynamize", CONV_CFG)]),
    "resnet:dynamize,partition,partition,compact+fold": (
        resnet, (IMAGE,), [("dynamize", CONV_CFG), ("partition", 0.5), ("partition", 0.3), ("compact_fold", None)]),
    "resnet:dynamize,partition,compact,fold": (
        resnet, (IMAGE,), [("dynamize", CONV_CFG), ("partition", 0.3), ("compact", None), ("fold", None)]),
    "resnet-sigmoid:dynamize,partition,compact+fold": (
        resnet, (IMAGE,), [("dynamize", SIGMOID_CFG), ("partition", 0.4), ("compact_fold", None)]),
    "resnet:dynamize,compact": (resnet, (IMAGE,), [("dynamize", CONV_CFG), ("compact", None)]),
    "mobilenet:dynamize,partition,compact+fold": (
        mobilenet, (IMAGE3,), [("dynamize", CONV_CFG), ("partition", 0.3), ("compact_fold", None)]),
    "bert:dynamize,partition,compact": (
        tiny_bert, (IDS, torch.ones_like(IDS)), [("dynamize", MOE_CFG), ("partition", 0.5), ("compact", None)]),
}


def apply(model, op, arg):
    if op == "dynamize":
        padnet.dynamize_(model, arg)
    elif op == "partition":
        magnitude(model, arg)
    elif op == "compact":
        padnet.compact_(model)
    elif op == "compact_fold":
        padnet.compact_(model, fold_bn=True)
    elif op == "fold":
        padnet.compact_(model, fold_bn=True)  # already compact: folds only


def assert_round_trip(model, inputs, tmp_path, tag):
    path = padnet.save(model, tmp_path / f"{tag}.safetensors")
    loaded = padnet.load(path).eval()
    assert get_state(loaded).to_dict() == get_state(model).to_dict()
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs)), tag
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    return loaded


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_after_every_transform(case, tmp_path):
    factory, inputs, steps = CASES[case]
    model = factory()
    assert_round_trip(model, inputs, tmp_path, "base")
    for i, (op, arg) in enumerate(steps):
        apply(model, op, arg)
        model.eval()
        assert_round_trip(model, inputs, tmp_path, f"step{i}")
    expected = {"dynamize": "dynamize", "partition": "partition", "compact": "compact", "fold": "fold_bn"}
    ops = []
    for op, _ in steps:
        ops += ["compact", "fold_bn"] if op == "compact_fold" else [expected[op]]
    assert get_state(model).ops() == ops


def test_bug_a_compact_fold_bn_save_load(tmp_path):
    """compact_(fold_bn=True) -> save -> load used to fail with missing BatchNorm keys."""
    model = resnet()
    padnet.dynamize_(model, CONV_CFG)
    magnitude(model, 0.3)
    padnet.compact_(model, fold_bn=True)
    loaded = padnet.load(padnet.save(model, tmp_path / "f.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IMAGE), model(IMAGE))
    pairs = get_state(loaded).last("fold_bn").params["pairs"]
    assert pairs and all(isinstance(loaded.get_submodule(bn), nn.Identity) for _, bn in pairs)


def test_load_into_given_base_model_and_hand_built_models(tmp_path):
    """Models without a zoo spec: load(path, model=base) replays onto the caller's static model."""
    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6),
                                                            nn.Dropout(0.0))).eval()

    model = build()
    padnet.dynamize_(model, padnet.PadConfig(target_types=["ffn"], moe=padnet.MoEConfig(num_experts=3, top_k=2)))
    magnitude(model, 0.4)
    padnet.compact_(model)
    path = padnet.save(model, tmp_path / "seq.safetensors")
    with pytest.raises(padnet.CheckpointError, match="no model spec stored"):
        padnet.load(path)
    loaded = padnet.load(path, model=build()).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a caller's model that is already dynamized the same way: the dynamize step is not replayed twice
    dyn = build()
    padnet.dynamize_(dyn, padnet.PadConfig(target_types=["ffn"], moe=padnet.MoEConfig(num_experts=3, top_k=2)))
    again = padnet.load(path, model=dyn).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_state_is_the_only_padnet_attribute():
    model = resnet()
    padnet.dynamize_(model, CONV_CFG)
    magnitude(model, 0.3)
    padnet.compact_(model, fold_bn=True)
    attrs = [k for k in vars(model) if k.startswith("padnet")]
    assert attrs == [STATE_ATTRIBUTE]
    assert isinstance(copy.deepcopy(model).padnet_state, PadState)


def test_pad_state_api_and_validation():
    state = PadState(model_spec={"name": "resnet10", "kwargs": {"width": 0.5}})
    state.append("dynamize", config=CONV_CFG.to_dict())
    state.append("partition", ratio=0.3)
    assert state.ops() == ["dynamize", "partition"]
    assert state.last("partition").params == {"ratio": 0.3}
    assert PadState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="unknown transform op 'bogus'"):
        state.append("bogus")
    with pytest.raises(TypeError, match="JSON"):
        state.append("partition", ratio=float("nan"))
    with pytest.raises(TypeError, match="JSON"):
        state.append("partition", tensor=torch.ones(1))
    with pytest.raises(ValueError, match="version"):
        PadState.from_dict({"version": 7, "steps": []})
    with pytest.raises(ValueError, match="unknown op"):
        PadState.from_dict({"version": 1, "steps": [{"op": "rm -rf", "params": {}}]})
    with pytest.raises(ValueError, match="model spec"):
        PadState.from_dict({"version": 1, "model_spec": ["resnet"], "steps": []})
    with pytest.raises(TypeError, match="nn.Module"):
        get_state("not a model")


def test_zoo_functions_record_their_spec_and_readme_example_round_trips(tmp_path):
    """issue 14 item 14: the README's example (zoo function called directly) reloads without model=."""
    from padnet.models import mobilenet_v2, resnet18

    assert get_state(resnet18(num_classes=10, small_input=True, width=0.125)).model_spec == {
        "name": "resnet18", "kwargs": {"num_classes": 10, "small_input": True, "width": 0.125}}
    assert get_state(mobilenet_v2(3, 0.25)).model_spec == {
        "name": "mobilenet_v2", "kwargs": {"num_classes": 3, "width_mult": 0.25}}
    torch.manual_seed(0)
    model = resnet18(num_classes=10, small_input=True, width=0.125)
    padnet.dynamize_(model, padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=2)))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    padnet.partition_(model, batches, torch.nn.functional.cross_entropy, ratio=0.3, criterion="taylor",
                      iterations=2)
    padnet.compact_(model)
    path = padnet.save(model, tmp_path / "pad_resnet18.safetensors")
    loaded = padnet.load(path).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_saved_files_are_mode_0644(tmp_path):
    """issue 14 item 14: padnet.save files are 0644 like the trainer's (not mkstemp's 0600)."""
    old = os.umask(0o022)
    try:
        path = padnet.save(resnet(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_partition_ratio_is_recorded_and_survives_load(tmp_path):
    """issue 10 bug (b), record side: the kappa a model was partitioned at is in its record, not in PadConfig."""
    model = resnet()
    padnet.dynamize_(model, CONV_CFG)
    magnitude(model, 0.3)
    loaded = padnet.load(padnet.save(model, tmp_path / "p.safetensors"))
    step = get_state(loaded).last("partition")
    assert step.params["ratio"] == 0.3 and step.params["criterion"] == "magnitude"
    assert abs(step.params["achieved_ratio"] - 0.3) < 0.01
    assert "dynamic_ratio" not in get_state(loaded).last("dynamize").params["config"]


def test_compact_twice_and_non_modules_are_clear_errors(tmp_path):
    """issue 14 item 12: compact_ twice, non-modules to compact_ / count_parameters / save / load."""
    model = resnet()
    padnet.dynamize_(model, CONV_CFG)
    padnet.compact_(model)
    with pytest.raises(ValueError, match="already in deploy"):
        padnet.compact_(model)
    with pytest.raises(ValueError, match="deploy"):
        padnet.dynamize_(model, CONV_CFG)
    for fn in (padnet.compact_, padnet.count_parameters, padnet.layer_counts):
        with pytest.raises(TypeError, match="nn.Module"):
            fn({"weight": torch.ones(1)})
    with pytest.raises(TypeError, match="nn.Module"):
        padnet.save({"weight": torch.ones(1)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(TypeError, match="nn.Module"):
        padnet.load(padnet.save(model, tmp_path / "m.safetensors"), model="resnet10")
    with pytest.raises(TypeError, match="fold_bn"):
        padnet.compact_(resnet(), fold_bn="yes")


def test_compact_form_counts_unchanged_by_load(tmp_path):
    model = resnet()
    padnet.dynamize_(model, CONV_CFG)
    magnitude(model, 0.3)
    padnet.compact_(model, fold_bn=True)
    loaded = padnet.load(padnet.save(model, tmp_path / "c.safetensors"))
    assert padnet.count_parameters(loaded) == padnet.count_parameters(model)
    assert sum(is_compact_layer(m) for m in loaded.modules()) == sum(is_compact_layer(m) for m in model.modules())
    assert not list(pad_layers(loaded))


def test_new_ops_register_a_replay_and_round_trip(tmp_path):
    """A later transform (e.g. gates) adds modules: it registers its op with a replay, nothing else changes."""
    from padnet.transforms.conversion import swap_module
    from padnet.transforms.record import get_replay, register_op

    class Gate(nn.Module):
        def __init__(self, inner, n):
            super().__init__()
            self.inner, self.logit = inner, nn.Parameter(torch.zeros(n))

        def forward(self, x):
            return self.inner(x) * torch.sigmoid(self.logit)

    def gate_(model, name):
        inner = model.get_submodule(name)
        swap_module(model, name, Gate(inner, inner.out_features))

    def replay(model, params, ctx):
        gate_(model, params["name"])

    register_op("test_gate", replay)
    try:
        with pytest.raises(ValueError, match="already has a replay"):
            register_op("test_gate", lambda *a: None)
        model = resnet()
        padnet.dynamize_(model, CONV_CFG)
        gate_(model, "fc")
        get_state(model).append("test_gate", name="fc")
        with torch.no_grad():
            model.fc.logit.fill_(0.7)
        loaded = assert_round_trip(model, (IMAGE,), tmp_path, "gated")
        assert isinstance(loaded.fc, Gate) and get_state(loaded).ops() == ["dynamize", "test_gate"]
    finally:
        from padnet.transforms import record

        record._KNOWN_OPS.pop("test_gate")
    with pytest.raises(KeyError, match="unknown transform op 'test_gate'"):
        get_replay("test_gate")
