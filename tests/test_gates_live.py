"""Learned mode gates with a second, live gate (issue 13: live vs pruned with its own budget)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import padnet
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.modes import pad_layers
from padnet.layers.moe import MoEFeedForward
from padnet.transforms.gates import ModeGates
from padnet.transforms.partition.units import round_half_up

pytestmark = pytest.mark.usefixtures("one_thread")


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(DynamicConv2d(3, 6, 3, padding=1), nn.ReLU(),
                         DynamicConv2d(6, 4, 3, padding=1, num_kernels=3))


def _conv1(seed: int = 0) -> nn.Module:
    """One gated layer: its training samples (dynamic, then live) use the same random stream as a plain one's."""
    torch.manual_seed(seed)
    return nn.Sequential(DynamicConv2d(3, 6, 3, padding=1, num_kernels=3))


def _moe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MoEFeedForward(8, 12, num_experts=4, top_k=2))


def _randomize(gates: ModeGates, seed: int, live: bool = True) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, g in gates.layer_gates():
            g.param.copy_(2.0 * torch.randn(g.num_units, generator=gen))
            if live and g.live_param is not None:
                g.live_param.copy_(2.0 * torch.randn(g.num_units, generator=gen))


def _counts(model: nn.Module) -> tuple[int, int, int]:
    """(dynamic, live, all) entries over the model's PAD layers."""
    dyn = live = n = 0
    for _, layer in pad_layers(model):
        for g in layer.mode_groups():
            dyn += int(g.mask.sum())
            live += g.num_live()
            n += g.mask.numel()
    return dyn, live, n


@pytest.mark.parametrize("make,x_shape", [(_conv1, (2, 3, 6, 6)), (_moe, (5, 8))])
@pytest.mark.parametrize("granularity", ["element", "kernel"])
def test_live_gate_fixed_open_equals_the_plain_gated_layer(make, x_shape, granularity):
    if make is _moe and granularity == "kernel":
        granularity = "channel"
    model, plain = make(1), make(1)
    x = torch.randn(*x_shape)
    gates = ModeGates(model, target_ratio=0.3, granularity=granularity, density=1.0)
    ref_gates = ModeGates(plain, target_ratio=0.3, granularity=granularity)
    _randomize(gates, 4, live=False)
    _randomize(ref_gates, 4, live=False)
    with torch.no_grad():
        for _, g in gates.layer_gates():
            g.live_param.fill_(50.0)  # z_l = 1 in every sample and at test time
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(plain, mode)()
        torch.manual_seed(5)
        y = model(x)
        torch.manual_seed(5)
        y_ref = plain(x)
        assert torch.equal(y, y_ref), mode
    y.square().sum().backward()
    y_ref.square().sum().backward()
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if "live_log_alpha" not in name:
            assert torch.equal(p.grad, ref[name].grad), name


def test_live_gate_in_the_graph_and_buffers_restored():
    model = _convnet(2)
    gates = ModeGates(model, target_ratio=0.3, density=0.6, init_noise=0.5)
    layer = model[0]
    live_before = layer.live_mask
    model.train()
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert layer.live_mask is live_before  # the hook put the buffers back
    for _, g in gates.layer_gates():
        assert g.live_param.grad is not None and bool(g.live_param.grad.abs().sum() > 0)


def test_live_penalty_is_its_own_budget():
    model = _convnet(3)
    gates = ModeGates(model, target_ratio=0.3, density=0.5, init_noise=0.3)
    with torch.no_grad():
        gates.multipliers.zero_()
        gates.live_multipliers.copy_(torch.tensor([[0.7, 0.2]]))
    live = sum(float(g.expected_live().detach()) for _, g in gates.layer_gates())
    n = sum(g.num_entries for _, g in gates.layer_gates())
    gap = live / n - 0.5
    pen = gates.penalty()
    assert abs(float(pen.detach()) - (0.7 * gap + 0.2 * gap * gap)) < 1e-6
    pen.backward()
    assert float(gates.live_multipliers.grad[0, 0]) == pytest.approx(-gap, abs=1e-6)  # ascent
    for _, g in gates.layer_gates():
        assert bool((g.live_param.grad > 0).all())  # over budget (density 0.95 > 0.5): close live gates
        assert g.param.grad is None or float(g.param.grad.abs().sum()) == 0.0  # the dynamic budget is silent
    assert gates.stats()["expected_density"] == pytest.approx(live / n, rel=1e-5)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("estimator", ["hard_concrete", "arm"])
def test_live_lagrangian_drives_the_density_to_the_target(scope, estimator):
    model = _convnet(4)
    gates = ModeGates(model, target_ratio=0.2, density=0.5, scope=scope, estimator=estimator)
    opt = gates.build_optimizer(lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        gates.penalty().backward()
        opt.step()
    s = gates.stats()
    assert s["expected_density"] == pytest.approx(0.5, abs=0.03)
    if scope == "layer":
        assert all(d == pytest.approx(0.5, abs=0.03) for d in s["layer_densities"].values())
    else:  # the dynamic budget lands on its own target alongside
        assert s["expected_cost_fraction"] == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("make,x_shape", [(_convnet, (2, 3, 6, 6)), (_moe, (5, 8))])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_hardening_hits_ratio_and_density_and_prunes(make, x_shape, scope, granularity):
    model = make(5)
    gates = ModeGates(model, target_ratio=0.3, density=0.55, scope=scope, granularity=granularity)
    _randomize(gates, 6)
    unit_max = max(int(g.unit_sizes.max()) for _, g in gates.layer_gates())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = gates.harden_(optimizer=opt)
    dyn, live, n = _counts(model)
    slack = 0 if granularity == "element" else unit_max  # structured: to one unit
    parts = [(dyn, live, n)] if scope == "global" else [_counts(layer) for _, layer in pad_layers(model)]
    for d, l_, m in parts:  # global: over all entries; layer scope: in every layer
        assert abs(d - round_half_up(0.3 * m)) <= slack, (d, m)
        assert abs(l_ - round_half_up(0.55 * m)) <= slack, (l_, m)
    assert report["density"] == pytest.approx(live / n)
    for _, layer in pad_layers(model):
        assert not hasattr(layer, "mode_gate")
        for g in layer.mode_groups():
            assert bool((g.mask <= g.live).all())  # a pruned entry is never dynamic
            dead = g.live == 0
            assert bool((g.static[dead] == 0).all()) and bool((g.dynamic[:, dead] == 0).all())
    # pruned entries contribute nothing: whatever their values, the output is the same
    model.eval()
    x = torch.randn(*x_shape)
    y = model(x)
    with torch.no_grad():
        for _, layer in pad_layers(model):
            for g in layer.mode_groups():
                dead = g.live == 0
                g.static[dead] = 7.0
                g.dynamic[:, dead] = -3.0
    assert torch.allclose(model(x), y, atol=1e-6, rtol=0)
    step = padnet.transforms.record.get_state(model).steps[-1]
    assert step.op == "harden_gates" and step.params["density"] == 0.55


def test_hardening_keeps_the_function_of_binary_gates_on_live_entries():
    """Gates already 0/1 with exactly the target counts: hardening changes nothing the layer computes."""
    model = _convnet(6)
    gates = ModeGates(model, target_ratio=0.25, density=0.5)
    gen = torch.Generator().manual_seed(0)
    n = sum(g.num_units for _, g in gates.layer_gates())
    order = torch.randperm(n, generator=gen)
    live_units = torch.zeros(n, dtype=torch.bool)
    live_units[order[: round_half_up(0.5 * n)]] = True
    dyn_units = torch.zeros(n, dtype=torch.bool)
    dyn_units[order[: round_half_up(0.25 * n)]] = True
    offset = 0
    with torch.no_grad():
        for _, g in gates.layer_gates():
            sl = slice(offset, offset + g.num_units)
            g.param.copy_(torch.where(dyn_units[sl], 50.0, -50.0))
            g.live_param.copy_(torch.where(live_units[sl], 50.0, -50.0))
            offset += g.num_units
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    gates.harden_()
    assert torch.allclose(model(x), y, atol=1e-5, rtol=1e-5)
    dyn, live, total = _counts(model)
    assert (dyn, live) == (round_half_up(0.25 * total), round_half_up(0.5 * total))


def test_state_round_trips_before_and_after_hardening(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    model = _convnet(7)
    gates = ModeGates(model, target_ratio=0.25, density=0.6, init_noise=0.5)
    _randomize(gates, 8)
    with torch.no_grad():
        gates.multipliers.fill_(0.5)
        gates.live_multipliers.fill_(0.25)
    model.eval()
    y = model(x)
    state, gstate = model.state_dict(), gates.state_dict()
    assert any(k.endswith("mode_gate.live_log_alpha") for k in state)
    padnet.save(model, tmp_path / "gated.safetensors")
    other = _convnet(8)
    other_gates = ModeGates(other, **gates.config())
    other.load_state_dict(state)
    other_gates.load_state_dict(gstate)
    assert torch.equal(other.eval()(x), y)
    assert torch.equal(other_gates.live_multipliers, gates.live_multipliers)
    loaded = padnet.load(tmp_path / "gated.safetensors", model=_convnet(9)).eval()  # replay re-attaches both gates
    assert torch.equal(loaded(x), y)
    resumed = ModeGates.from_model(loaded)
    assert resumed.density == 0.6
    for (_, a), (_, b) in zip(resumed.layer_gates(), gates.layer_gates()):
        assert torch.equal(a.live_param, b.live_param) and torch.equal(a.param, b.param)
    gates.harden_()
    y_hard = model(x)
    padnet.save(model, tmp_path / "hard.safetensors")
    back = padnet.load(tmp_path / "hard.safetensors", model=_convnet(10)).eval()
    assert torch.equal(back(x), y_hard)
    sd, ref = back.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert any("live_mask" in k for k in ref)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2, float("nan"), True, "half", 0.1])
def test_bad_density_raises_naming_it(density):
    model = _convnet(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="density"):
        ModeGates(model, target_ratio=0.3, density=density)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "mode_gate") for m in model.modules())


def test_hard_live_masks_without_density_raises():
    gates = ModeGates(_convnet(0), target_ratio=0.3)
    with pytest.raises(ValueError, match="density"):
        gates.hard_live_masks()


def test_arm_live_gate_gets_the_arm_gradient():
    model = _convnet(11)
    gates = ModeGates(model, target_ratio=0.3, density=0.6, estimator="arm")
    x = torch.randn(2, 3, 6, 6)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    for _, g in gates.layer_gates():
        assert g._arm_u is not None and g._arm_u_live is not None
    u = {name: (g._arm_u.clone(), g._arm_u_live.clone()) for name, g in gates.layer_gates()}
    gates.arm_update_(loss, lambda: model(x).square().mean())
    for name, g in gates.layer_gates():
        assert g._arm_u is None and g._arm_u_live is None
        # k (f' - f) (u - 1/2) for both gates, with the same scalar f' - f
        ratio_d = g.param.grad / (u[name][0] - 0.5)
        ratio_l = g.live_param.grad / (u[name][1] - 0.5)
        assert torch.allclose(ratio_l, ratio_d[:1].expand_as(ratio_l), rtol=1e-4)
    for _, layer in pad_layers(model):  # the in-place 0/1 masks keep D <= L
        for grp in layer.mode_groups():
            assert bool((grp.mask <= grp.live).all())


def test_cli_gates_with_density_learns_pruned_entries(tmp_path):
    from padnet.data import DEFAULT_FASHION_MNIST_ROOT

    if not any((DEFAULT_FASHION_MNIST_ROOT / f).exists()
               for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")):
        pytest.skip("Fashion-MNIST not installed")
    import json

    from padnet.cli import main

    out = tmp_path / "run"
    assert main(["train", "--variant", "pad", "--partition", "gates", "--target-ratio", "0.3", "--density", "0.6",
                 "--width", "0.125", "--max-train-samples", "64", "--max-test-samples", "32", "--batch-size", "32",
                 "--epochs", "1", "--harden-at", "0.5", "--seed", "1", "--quiet", "--output-dir", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["dynamic_ratio"] == pytest.approx(0.3, abs=0.005)
    report = s["gates"]["harden_report"]
    assert report["density"] == pytest.approx(0.6, abs=0.005)
    model = padnet.load(out / "model.safetensors")
    live = sum(g.num_live() for _, layer in padnet.layers.pad_layers(model) for g in layer.mode_groups())
    total = sum(g.mask.numel() for _, layer in padnet.layers.pad_layers(model) for g in layer.mode_groups())
    assert live / total == pytest.approx(0.6, abs=0.005)
