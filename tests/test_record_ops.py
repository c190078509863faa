"""The transform record of later transforms: gates (replayed), hardening, transitions, the scheduler (provenance)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import padnet
from padnet.io.serialization import CheckpointError
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.models import create_model
from padnet.transforms.gates import LayerGate, ModeGates
from padnet.transforms.record import find_state
from padnet.transforms.scheduler import ModeScheduler
from padnet.transforms.transitions import ModeTransition, set_modes_

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(2))
CONV_CFG = padnet.PadConfig(conv=padnet.DynamicConvConfig(num_kernels=2), seed=0)
MOE_CFG = padnet.PadConfig(moe=padnet.MoEConfig(num_experts=2, top_k=1), seed=0)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet10", num_classes=3, in_chans=1, small_input=True, width=0.1)
    padnet.dynamize_(model, CONV_CFG)
    return model


def _bert() -> nn.Module:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = create_model("tiny_bert", num_labels=2, vocab_size=30, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=16, dropout=0.0)
    padnet.dynamize_(model, MOE_CFG)
    return model


def _gate_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".mode_gate." in k}


def _randomise_gates(model: nn.Module, seed: int) -> None:
    """Spread the gate parameters so that the deterministic gates mix 0, 1 and fractions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerGate):
                m.param.copy_(torch.randn(m.param.shape, generator=gen) * 2.0)
                m.sharpness.fill_(2.5)


def _ops(model: nn.Module) -> list[str]:
    return find_state(model).ops()


# ----------------------------------------------------------------------------- gates: save / load
@pytest.mark.parametrize("factory,inputs,kwargs", [
    (_resnet, (IMAGE,), {"target_ratio": 0.3}),
    (_resnet, (IMAGE,), {"target_ratio": 0.5, "granularity": "kernel", "estimator": "arm", "scope": "layer"}),
    (_bert, (IDS, torch.ones_like(IDS)), {"target_ratio": 0.4, "granularity": "channel"}),
], ids=["resnet-hc-element", "resnet-arm-kernel", "bert-moe-channel"])
def test_gated_model_round_trips_and_its_controller_resumes(factory, inputs, kwargs, tmp_path):
    model = factory()
    gates = ModeGates(model, **kwargs)
    _randomise_gates(model, 3)
    with torch.no_grad():
        gates.multipliers.fill_(0.25)
        gates.step(0.4)
    model.eval()
    with torch.no_grad():
        y = model(*inputs)
    y = y.logits if hasattr(y, "logits") else y
    assert _ops(model)[-1] == "gates"
    step = find_state(model).last("gates").params
    assert step["config"] == gates.config()
    assert [name for name, _ in step["layers"]] == [name for name, _ in gates.layer_gates()]

    path = padnet.save(model, tmp_path / "gated.safetensors")
    loaded = padnet.load(path).eval()
    # the gate parameters and sharpness buffers loaded exactly, the gates act in the forward pass
    assert _gate_params(loaded).keys() == _gate_params(model).keys() and _gate_params(model)
    assert all(torch.equal(a, _gate_params(model)[k]) for k, a in _gate_params(loaded).items())
    with torch.no_grad():
        out = loaded(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    assert torch.equal(out, y)
    assert _ops(loaded) == _ops(model)

    # the controller comes back from the record; its own state travels in its state_dict
    again = ModeGates.from_model(loaded)
    again.load_state_dict(gates.state_dict())
    assert again.config() == gates.config()
    assert torch.equal(again.multipliers, gates.multipliers) and again.sharpness == gates.sharpness
    assert float(again.penalty().detach()) == pytest.approx(float(gates.penalty().detach()), rel=1e-6)
    assert _ops(loaded) == _ops(model)  # from_model records nothing
    assert {k: v.tolist() for k, v in again.hard_masks().items()} == \
        {k: v.tolist() for k, v in gates.hard_masks().items()}

    # hardened: the record says so, the file has no gates, load builds none
    report = gates.harden_()
    assert _ops(model)[-2:] == ["gates", "harden_gates"]  # harden_'s transition folded in, not a step of its own
    hard = find_state(model).last("harden_gates").params
    assert hard["mode"] == "harden" and hard["ratio"] == report["ratio"]
    assert hard["transition"]["to_static"] == report["transitions"]["to_static"]
    with torch.no_grad():
        y_hard = model(*inputs)
    y_hard = y_hard.logits if hasattr(y_hard, "logits") else y_hard
    back = padnet.load(padnet.save(model, tmp_path / "hard.safetensors")).eval()
    assert not any(isinstance(m, LayerGate) for m in back.modules())
    assert not _gate_params(back)
    with torch.no_grad():
        out = back(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    assert torch.equal(out, y_hard)
    with pytest.raises(ValueError, match="hardened"):
        ModeGates.from_model(back)
    # a hardened model can be gated again, and that round trips too
    ModeGates(back, target_ratio=0.2)
    twice = padnet.load(padnet.save(back, tmp_path / "twice.safetensors"))
    assert _ops(twice)[-3:] == ["gates", "harden_gates", "gates"]
    assert _gate_params(twice).keys() == _gate_params(back).keys()


def test_removed_gates_load_without_gates_and_into_a_given_model(tmp_path):
    model = _resnet()
    gates = ModeGates(model)
    path = padnet.save(model, tmp_path / "g.safetensors")
    base = _resnet()  # already dynamized: the gates step is replayed onto it
    loaded = padnet.load(path, model=base)
    assert _gate_params(loaded).keys() == _gate_params(model).keys()
    gates.remove_()
    assert find_state(model).last("harden_gates").params == {"mode": "remove"}
    back = padnet.load(padnet.save(model, tmp_path / "r.safetensors"))
    assert not _gate_params(back)


def test_from_model_without_gates_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'gates' step"):
        ModeGates.from_model(_resnet())
    model = _resnet()
    ModeGates(model)
    first = next(m for m in model.modules() if isinstance(m, LayerGate))
    owner = next(m for m in model.modules() if m._modules.get("mode_gate") is first)
    del owner._modules["mode_gate"]
    with pytest.raises(ValueError, match="no LayerGate attached"):
        ModeGates.from_model(model)


def _rewrite(path, out, edit_state=None, edit_tensors=None):
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["padnet"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_state:
        edit_state(meta["state"])
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out), metadata={"padnet": json.dumps(meta)})
    return out


def _gates_step(state):
    return next(s for s in state["steps"] if s["op"] == "gates")["params"]


@pytest.mark.parametrize("edit_state,edit_tensors,match", [
    (lambda st: _gates_step(st)["layers"][0].__setitem__(1, 10**12), None, r"shape .* the record says"),
    (lambda st: _gates_step(st)["layers"].append(["nope", 4]), None, "'nope' is gated but the file has no tensor"),
    (lambda st: _gates_step(st)["config"].__setitem__("granularity", "row"), None, "granularity"),
    (lambda st: _gates_step(st)["config"].__setitem__("target_ratio", 7), None, "target_ratio"),
    (lambda st: _gates_step(st).__setitem__("layers", "all"), None, "layers"),
    (lambda st: _gates_step(st)["config"].__setitem__("evil", 1), None, "unknown gate config keys"),
    (lambda st: st["steps"].append({"op": "harden_gates", "params": {"mode": "melt"}}), None, "mode"),
    (None, lambda t: t.__setitem__(next(k for k in t if k.endswith("mode_gate.log_alpha")),
                                   torch.full_like(t[next(k for k in t if k.endswith("mode_gate.log_alpha"))],
                                                   float("nan"))), "NaN"),
], ids=["huge-units", "unknown-layer", "bad-granularity", "bad-ratio", "layers-not-list", "unknown-key",
        "bad-harden-mode", "nan-gates"])
def test_bad_gates_step_is_refused_before_building(edit_state, edit_tensors, match, tmp_path, monkeypatch):
    model = _resnet()
    ModeGates(model)
    path = padnet.save(model, tmp_path / "g.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_state, edit_tensors)
    import padnet.io.serialization as ser

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built for a file whose record does not fit")

    monkeypatch.setattr(ser, "create_model", no_build)
    with pytest.raises(CheckpointError, match=match) as info:
        padnet.load(bad)
    assert "bad.safetensors" in str(info.value)


def test_gates_step_that_does_not_fit_the_rebuilt_model(tmp_path):
    """Consistent with the file but not with the model the spec builds: refused, naming the layer."""
    model = _resnet()
    ModeGates(model, granularity="kernel")
    path = padnet.save(model, tmp_path / "g.safetensors")

    def swap(state):
        _gates_step(state)["config"]["granularity"] = "channel"  # same tensors, other unit count

    with pytest.raises(CheckpointError, match=r"units, the record says"):
        padnet.load(_rewrite(path, tmp_path / "bad.safetensors", swap))


# ----------------------------------------------------------------------------- provenance steps
def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(3, 6, 3, padding=1), nn.ReLU(), DynamicConv2d(6, 4, 3, padding=1))
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6))  # routing statistics for the transitions
    return model


def test_set_modes_and_mode_transition_record_totals_only():
    model = _conv_model()
    mask = torch.zeros_like(model[0].mode_mask)
    mask.view(-1)[:10] = 1
    report = set_modes_(model, {"0": {"weight": mask}})
    step = find_state(model).last("transition")
    assert step.params == report.summary()
    assert step.params["to_static"] == report.to_static == int((model[0].mode_mask == 0).sum()) > 0
    assert step.params["layers_changed"] == 1 and "layers" not in json.dumps(step.params).replace("layers_changed", "")
    # a no-op commit, a rolled-back session and record=False leave no step
    n = len(find_state(model).steps)
    set_modes_(model, {"0": {"weight": mask}})
    session = ModeTransition(model)
    session.set_masks({"2": {"weight": torch.zeros_like(model[2].mode_mask)}})
    session.rollback()
    set_modes_(model, {"2": {"weight": torch.zeros_like(model[2].mode_mask)}}, record=False)
    assert len(find_state(model).steps) == n
    # a bare PAD layer gets no record of its own
    layer = _conv_model()[0]
    set_modes_(layer, {"": {"weight": torch.zeros_like(layer.mode_mask)}})
    assert find_state(layer) is None


def test_partition_folds_its_transition_into_the_partition_step():
    model = _conv_model()
    report = padnet.partition_(model, None, None, ratio=0.4, criterion="magnitude", iterations=2)
    assert _ops(model) == ["partition"]
    params = find_state(model).last("partition").params
    assert params["transition"] == {"preserve": True, "to_dynamic": report.transition["to_dynamic"],
                                    "to_static": report.transition["to_static"]}
    assert params["transition"]["to_static"] > 0


def test_mode_scheduler_records_its_config_once(tmp_path):
    model = _conv_model()
    padnet.partition_(model, None, None, ratio=0.5, criterion="magnitude", iterations=1)
    sched = ModeScheduler(model, None, total_steps=8, update_interval=2, repartition="magnitude", growth="random",
                          fraction=0.3)
    assert _ops(model) == ["partition", "mode_scheduler"]
    cfg = find_state(model).last("mode_scheduler").params
    assert cfg == sched.config()
    assert cfg["repartition"] == "magnitude" and cfg["growth"] == "random" and cfg["update_interval"] == 2
    before = [m.clone() for m in (model[0].mode_mask, model[2].mode_mask)]
    records = [sched.step() for _ in range(6)]
    assert any(r is not None for r in records)
    moved = any(not torch.equal(a, b) for a, b in zip(before, (model[0].mode_mask, model[2].mode_mask)))
    assert moved
    assert _ops(model) == ["partition", "mode_scheduler"]  # updates add no steps
    loaded = padnet.load(padnet.save(model, tmp_path / "s.safetensors"), model=_conv_model())
    assert _ops(loaded) == ["partition", "mode_scheduler"]
    assert torch.equal(loaded[0].mode_mask, model[0].mode_mask)
