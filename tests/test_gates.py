"""Learned mode gates (issue 13): estimators, exactness, budget, hardening, save/load, bad input, trainer."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import padnet
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.modes import pad_layers
from padnet.layers.moe import MoEFeedForward
from padnet.transforms.gates import ARM, HardConcrete, ModeGates

pytestmark = pytest.mark.usefixtures("one_thread")


def _convnet(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(DynamicConv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(),
                         DynamicConv2d(6, 4, 3, padding=1, num_kernels=3))


def _moe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MoEFeedForward(8, 12, num_experts=4, top_k=2))


def _set_gates(gates: ModeGates, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, g in gates.layer_gates():
            g.param.copy_(values[name])


def _random_unit_masks(gates: ModeGates, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(g.num_units, generator=gen) < 0.4 for name, g in gates.layer_gates()}


# ---------------------------------------------------------------------------------- estimators
def test_hard_concrete_formulas_match_the_paper_in_float64():
    hc = HardConcrete()
    log_alpha = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    beta = 2.0 / 3.0
    torch.manual_seed(0)
    z = hc.sample(log_alpha.expand(200_000, 3).clone(), 1.0 / beta)
    torch.manual_seed(0)
    u = torch.rand(200_000, 3, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    ref = (torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / beta) * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(z, ref, atol=1e-12)
    expected_l0 = torch.sigmoid(log_alpha - beta * math.log(0.1 / 1.1))
    assert torch.allclose(hc.prob_open(log_alpha, 1.0 / beta), expected_l0)
    assert torch.allclose((z > 0).double().mean(0), expected_l0, atol=5e-3)  # Monte Carlo P(z != 0)
    det = hc.deterministic(log_alpha, 1.0 / beta)
    assert torch.allclose(det, (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1))
    assert hc.init_value(0.2, 1.5) == pytest.approx(math.log(0.8 / 0.2))
    z.requires_grad_(False)
    la = log_alpha.clone().requires_grad_(True)
    hc.sample(la, 1.5).sum().backward()
    assert la.grad is not None and torch.isfinite(la.grad).all()


def test_arm_gradient_is_unbiased_against_exact_enumeration():
    """4 channel gates on one conv: the ARM estimate averages to d E[f(z)] / d phi (2^4 configurations)."""
    torch.manual_seed(0)
    layer = DynamicConv2d(2, 4, 3, padding=1, num_kernels=2)
    x = torch.randn(2, 2, 4, 4)
    target = torch.randn(2, 4, 4, 4)
    gates = ModeGates(layer, target_ratio=0.5, granularity="channel", estimator="arm", sharpness=2.0, init_noise=0.0)
    (_, gate), = list(gates.layer_gates())
    with torch.no_grad():
        gate.phi.copy_(torch.tensor([0.3, -0.2, 0.0, 0.6]))

    def f() -> torch.Tensor:
        return ((layer(x) - target) ** 2).mean()

    # exact gradient of E[f(z)] by enumeration (a plain layer with each 0/1 channel mask)
    plain = DynamicConv2d(2, 4, 3, padding=1, num_kernels=2)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "mode_gate" not in k})
    plain.eval()
    phi = gate.phi.detach().clone().requires_grad_(True)
    p = torch.sigmoid(2.0 * phi)
    expectation = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=4):
        zb = torch.tensor(bits)
        with torch.no_grad():
            plain.mode_mask.copy_(zb.view(4, 1, 1, 1).expand_as(plain.mode_mask))
            fz = float(((plain(x) - target) ** 2).mean())
        expectation = expectation + fz * torch.prod(torch.where(zb > 0, p, 1 - p))
    exact, = torch.autograd.grad(expectation, phi)

    layer.eval()
    layer.training = True  # routing stats do not matter; gates sample in training mode
    layer.mode_gate.train()
    est = torch.zeros(4)
    n = 2000
    for _ in range(n):
        gate.phi.grad = None
        with torch.no_grad():
            loss = f()
        gates.arm_update_(loss, f)
        est += gate.phi.grad
    est /= n
    assert torch.allclose(est, exact, atol=0.25 * float(exact.abs().max()) + 2e-4), (est, exact)
    assert torch.sign(est).eq(torch.sign(exact)).all()


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("estimator", ["hard_concrete", "arm"])
@pytest.mark.parametrize("granularity", ["element", "kernel", "channel"])
def test_gates_fixed_open_closed_equal_the_plain_pad_layer(estimator, granularity):
    model = _convnet(1)
    plain = _convnet(1)
    x = torch.randn(2, 3, 6, 6)
    gates = ModeGates(model, target_ratio=0.4, granularity=granularity, estimator=estimator, sharpness=1e4)
    units = _random_unit_masks(gates, 3)
    big = 50.0 if estimator == "hard_concrete" else 1.0  # ARM: k * phi = +-1e4
    _set_gates(gates, {n: torch.where(u, big, -big) for n, u in units.items()})
    layers = dict(pad_layers(plain))
    for name, g in gates.layer_gates():
        for group, m in g.group_masks(units[name].float()).items():
            layers[name].set_mode_mask(group, m)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(plain, mode)()
        y, y_ref = model(x), plain(x)
        assert torch.equal(y, y_ref), mode
    # gradients of the factors are the plain layer's as well
    model.train(), plain.train()
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if "mode_gate" not in name:
            assert torch.equal(p.grad, ref[name].grad), name


def test_moe_gates_fixed_equal_plain_moe():
    model, plain = _moe(2), _moe(2)
    x = torch.randn(5, 8)
    gates = ModeGates(model, target_ratio=0.3, sharpness=1e4)
    units = _random_unit_masks(gates, 4)
    _set_gates(gates, {n: torch.where(u, 50.0, -50.0) for n, u in units.items()})
    layers = dict(pad_layers(plain))
    for name, g in gates.layer_gates():
        for group, m in g.group_masks(units[name].float()).items():
            layers[name].set_mode_mask(group, m)
    model.train(), plain.train()
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_fractional_gates_mix_both_copies_in_eval_and_under_no_grad(granularity):
    """Deterministic hard-concrete gates in (0, 1): W_hat = lambda_d z sum pi W_k + lambda_s (1 - z) W_s."""
    torch.manual_seed(0)
    layer = DynamicConv2d(3, 4, 3, padding=1)
    gates = ModeGates(layer, target_ratio=0.5, granularity=granularity)
    (_, gate), = list(gates.layer_gates())
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-1.0, 1.0, gate.num_units))
    x = torch.randn(2, 3, 5, 5)
    layer.eval()
    z = gate.group_masks(gate.deterministic_units())["weight"].detach()
    assert ((z > 0) & (z < 1)).any()
    pi = layer.routing_weights(x)
    lambda_s, lambda_d = layer.scales()
    w = (lambda_d * z * torch.einsum("bk,k...->b...", pi, layer.weight_dynamic)
         + lambda_s * (1 - z) * layer.weight_static)
    ref = torch.cat([torch.nn.functional.conv2d(x[i:i + 1], w[i], padding=1) for i in range(2)])
    with torch.no_grad():
        y_nograd = layer(x)
    y_grad = layer(x)
    torch.testing.assert_close(y_nograd, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_grad.detach(), ref, rtol=1e-5, atol=1e-6)


def test_hard_concrete_gate_is_in_the_graph_and_buffers_are_restored():
    model = _convnet()
    gates = ModeGates(model, target_ratio=0.3)
    buf = model[0].mode_mask
    model.train()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model[0].mode_mask is buf and not buf.requires_grad  # restored after forward
    assert model[0].mode_gate.log_alpha.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="input channels"):  # restored even when forward raises
        model(torch.randn(2, 5, 5, 5))
    assert model[0].mode_mask is buf


# ---------------------------------------------------------------------------------- budget
def test_penalty_is_cost_weighted_and_multipliers_ascend():
    model = _convnet()  # layer 0: K=4 (cost 3), layer 2: K=3 (cost 2)
    gates = ModeGates(model, target_ratio=0.3)
    exp = {n: float(g.expected_dynamic().detach()) for n, g in gates.layer_gates()}
    n = {name: g.num_entries for name, g in gates.layer_gates()}
    c = (3 * exp["0"] + 2 * exp["2"]) / (3 * n["0"] + 2 * n["2"])
    with torch.no_grad():
        gates.multipliers.copy_(torch.tensor([[2.0, 3.0]]))
    assert float(gates.penalty().detach()) == pytest.approx(2 * (c - 0.3) + 3 * (c - 0.3) ** 2, rel=1e-5)
    s = gates.stats()
    assert s["expected_cost_fraction"] == pytest.approx(c, rel=1e-6)
    assert s["expected_ratio"] == pytest.approx((exp["0"] + exp["2"]) / (n["0"] + n["2"]), rel=1e-6)
    gates.penalty().backward()
    assert (gates.multipliers.grad < 0).all()  # reversed: a descent step raises lambda while c > t
    assert all((g.param.grad > 0).all() for _, g in gates.layer_gates())  # pushes gates closed


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("estimator", ["hard_concrete", "arm"])
def test_lagrangian_drives_the_expected_ratio_to_the_target(scope, estimator):
    model = _convnet()
    gates = ModeGates(model, target_ratio=0.3, scope=scope, estimator=estimator)
    opt = gates.build_optimizer(lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        gates.penalty().backward()
        opt.step()
    s = gates.stats()
    assert s["expected_cost_fraction" if scope == "global" else "expected_ratio"] == pytest.approx(0.3, abs=0.03)
    if scope == "layer":
        assert all(r == pytest.approx(0.3, abs=0.03) for r in s["layer_ratios"].values())


def test_expand_starts_hibernating_and_sharpness_schedules():
    model = _convnet()
    gates = ModeGates(model, init="hibernate", estimator="arm", schedule="npn", sharpness=2.0, sharpness_end=200.0,
                      npn_stages=(0.25, 0.75))
    assert gates.stats()["expected_ratio"] < 0.1
    assert [gates.sharpness_at(t) for t in (0.0, 0.3, 0.8)] == [200.0, 2.0, 200.0]
    g2 = ModeGates(_convnet(), schedule="geometric", sharpness=1.0, sharpness_end=100.0)
    assert g2.step(0.5) == pytest.approx(10.0) and g2.sharpness == pytest.approx(10.0)
    g3 = ModeGates(_convnet(), schedule="linear", sharpness=1.0, sharpness_end=3.0)
    assert g3.sharpness_at(0.5) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("granularity,scope", [("element", "global"), ("element", "layer"), ("kernel", "global"),
                                               ("channel", "global")])
def test_hardening_hits_the_target_ratio(granularity, scope):
    model = _convnet()
    gates = ModeGates(model, target_ratio=0.3, granularity=granularity, scope=scope, init_noise=1.0)
    total = sum(g.num_entries for _, g in gates.layer_gates())
    largest = max(int(g.unit_sizes.max()) for _, g in gates.layer_gates())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = gates.harden_(opt)
    ratios = {n: m.dynamic_ratio() for n, m in pad_layers(model)}
    dyn = sum(sum(float(g.mask.sum()) for g in m.mode_groups()) for _, m in pad_layers(model))
    tol = 0.5 / total if granularity == "element" else largest / total
    assert dyn / total == pytest.approx(0.3, abs=tol) and report["ratio"] == pytest.approx(dyn / total)
    if scope == "layer":
        assert all(r == pytest.approx(0.3, abs=1 / 200) for r in ratios.values())
    assert not any("mode_gate" in n for n, _ in model.named_parameters())
    for _, m in pad_layers(model):
        for g in m.mode_groups():
            assert set(g.mask.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(RuntimeError, match="already hardened"):
        gates.harden_()


def test_hardening_keeps_the_function_and_resets_optimizer_state():
    """Gates at 1, fractional and 0; target = the units with z > 0: only the exact fold happens."""
    model = _convnet(5)
    x = torch.randn(3, 3, 6, 6)
    gates = ModeGates(model, target_ratio=0.3, scope="layer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(0)
    vals = {}
    kept = 0
    for name, g in gates.layer_gates():
        n_keep = int(round(0.3 * g.num_units))
        v = torch.full((g.num_units,), -50.0)
        idx = torch.randperm(g.num_units, generator=gen)[:n_keep]
        v[idx] = torch.where(torch.rand(n_keep, generator=gen) < 0.5, 50.0, 0.7)
        vals[name] = v
        kept += n_keep
    _set_gates(gates, vals)
    model.eval()
    with torch.no_grad():
        before = model(x)
    gate_params = {id(p) for p in gates.gate_parameters()} | {id(gates.multipliers)}
    report = gates.harden_(opt)
    with torch.no_grad():
        after = model(x)
    assert report["fractional_gates_folded"] > 0 and report["transitions"]["to_static"] == 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # the folded (fractional) entries lost their momentum; gates left the optimizer
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not ids & gate_params
    assert len(ids) == len(list(model.parameters()))
    mom = opt.state[model[0].weight_dynamic]["momentum_buffer"]
    frac = (vals["0"][:162] == 0.7).view(6, 3, 3, 3)  # weight units first, then the 6 bias units
    assert (mom[:, frac] == 0).all() and (mom[:, ~frac] != 0).any()


def test_hardening_after_training_steps_is_function_preserving_up_to_routing():
    """A real fold (dynamic -> static entries): output changes by the routing approximation only."""
    model = _convnet(6)
    x = torch.randn(4, 3, 6, 6)
    gates = ModeGates(model, target_ratio=0.3)
    model.train()
    for _ in range(3):
        model(x)
    model.eval()
    with torch.no_grad():
        before = model(x)
        report = gates.harden_()
        after = model(x)
    assert report["transitions"]["to_static"] > 0
    rel = float((after - before).norm() / before.norm())
    assert rel < 0.5  # not exact (static = mean routing), but nothing like a random W_s


# ---------------------------------------------------------------------------------- save / load
def test_state_round_trips_before_and_after_hardening(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    model = _convnet(7)
    gates = ModeGates(model, target_ratio=0.25, init_noise=0.5)
    with torch.no_grad():
        gates.multipliers.fill_(0.5)
    model.eval()
    y = model(x)
    state, gstate = model.state_dict(), gates.state_dict()
    padnet.save(model, tmp_path / "gated.safetensors")
    # before hardening: rebuild the same model, attach the same gates, load
    other = _convnet(8)
    other_gates = ModeGates(other, **gates.config())
    other.load_state_dict(state)
    other_gates.load_state_dict(gstate)
    other.eval()
    assert torch.equal(other(x), y)
    assert torch.equal(other_gates.multipliers, gates.multipliers)
    third = _convnet(9)
    ModeGates(third, **gates.config())
    loaded = padnet.load(tmp_path / "gated.safetensors", model=third).eval()
    assert torch.equal(loaded(x), y)
    # after hardening: a plain PAD model, padnet.save / padnet.load
    gates.harden_()
    y_hard = model(x)
    padnet.save(model, tmp_path / "hard.safetensors")
    back = padnet.load(tmp_path / "hard.safetensors", model=_convnet(10)).eval()
    assert torch.equal(back(x), y_hard)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"target_ratio": 0.0}, "target_ratio"), ({"target_ratio": 1.5}, "target_ratio"),
    ({"target_ratio": float("nan")}, "target_ratio"), ({"target_ratio": True}, "target_ratio"),
    ({"estimator": "gumbel"}, "estimator"), ({"granularity": "row"}, "granularity"),
    ({"sharpness": -1.0}, "sharpness"), ({"sharpness": float("nan")}, "sharpness"),
    ({"sharpness_end": float("inf")}, "sharpness_end"), ({"scope": "block"}, "scope"), ({"init": "closed"}, "init"),
    ({"schedule": "cosine"}, "schedule"), ({"init_drop": 1.0}, "init_drop"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    model = _convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ModeGates(model, **kwargs)
    assert model.state_dict().keys() == before.keys()  # nothing attached
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bad_models_and_runtime_errors():
    with pytest.raises(ValueError, match="no PAD layers"):
        ModeGates(nn.Sequential(nn.Conv2d(3, 4, 3)))
    compact = _convnet()
    padnet.compact_(compact)
    with pytest.raises(ValueError, match="compact"):
        ModeGates(compact)
    model = _convnet()
    gates = ModeGates(model)
    with pytest.raises(ValueError, match="already has gates"):
        ModeGates(model)
    with pytest.raises(ValueError, match="harden them first"):
        padnet.compact_(model)
    for bad in (-1.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="sharpness"):
            gates.set_sharpness(bad)
    with torch.no_grad():
        model[2].mode_gate.log_alpha[3] = float("nan")
    with pytest.raises(FloatingPointError, match="'2'"):
        gates.check_finite()
    with pytest.raises(FloatingPointError, match="'2'"):
        gates.harden_()
    with pytest.raises(ValueError, match="estimator='arm'"):
        gates.arm_update_(0.0, lambda: torch.zeros(()))
    with pytest.raises(KeyError, match="unknown layer"):
        ModeGates(_convnet()).harden_(routing_means={"nope": torch.ones(4)})


# ---------------------------------------------------------------------------------- trainer / CLI
CLI = ["train", "--variant", "pad", "--partition", "gates", "--target-ratio", "0.3", "--width", "0.125",
       "--max-train-samples", "128", "--max-test-samples", "32", "--batch-size", "32", "--epochs", "2",
       "--temperature-epochs", "1", "--seed", "1", "--quiet"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fmnist():
    from padnet.data import DEFAULT_FASHION_MNIST_ROOT

    if not any((DEFAULT_FASHION_MNIST_ROOT / f).exists()
               for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")):
        pytest.skip("Fashion-MNIST not installed")


@pytest.mark.slow
@pytest.mark.parametrize("harden_at", ["0.75", "0.25"])  # checkpoint of epoch 1 before / after hardening
def test_cli_gates_train_harden_and_resume_bit_exactly(tmp_path, fmnist, harden_at):
    from padnet.cli import main

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*CLI, "--harden-at", harden_at]
    assert main([*args, "--output-dir", str(full)]) == 0
    s = json.loads((full / "summary.json").read_text())
    assert s["dynamic_ratio"] == pytest.approx(0.3, abs=0.005)
    assert s["gates"]["harden_report"]["ratio"] == pytest.approx(0.3, abs=0.005)
    assert (full / "gates.png").exists() and "gates.png" in s["files"]
    rows = _rows(full)
    assert {"gate_expected_ratio", "gate_layer_ratios", "gate_entropy", "gate_penalty"} <= rows[0].keys()
    assert rows[-1]["gates_hardened"] is True
    # resume from the epoch-1 checkpoint (before hardening for 0.75, after it for 0.25)
    assert main([*args, "--output-dir", str(resumed)]) == 0
    shutil.copy(resumed / "checkpoint.prev.pt", resumed / "checkpoint.pt")
    (resumed / "summary.json").unlink()
    assert main(["train", "--resume", "--output-dir", str(resumed), "--quiet"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(_rows(resumed)) == strip(rows)
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_arm_gates_and_bad_flags(tmp_path, fmnist):
    from padnet.cli import main

    out = tmp_path / "arm"
    assert main([*CLI, "--gate-estimator", "arm", "--gate-init", "hibernate", "--partition-granularity", "kernel",
                 "--harden-at", "0.5", "--output-dir", str(out), "--epochs", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["dynamic_ratio"] == pytest.approx(0.3, abs=0.005)
    for flag, value in (("--gate-estimator", "gumbel"), ("--harden-at", "1.5"), ("--gate-sharpness", "-1"),
                        ("--partition", "magic"), ("--gate-schedule", "cosine")):
        assert main([*CLI, flag, value, "--output-dir", str(tmp_path / "bad")]) != 0
        assert not (tmp_path / "bad" / "summary.json").exists()


def test_gate_driver_schedule_hardening_and_checkpoint_state():
    """The trainer glue without data: hardening step, optimizer groups, checkpoint round trip, mismatch."""
    from padnet.train import TrainConfig
    from padnet.train.gating import GateDriver

    cfg = TrainConfig(variant="pad", partition="gates", ratio=0.3, gate_estimator="arm", harden_at=1.0).validate()
    x = torch.randn(2, 3, 5, 5)

    def build():
        model = _convnet(11)
        driver = GateDriver(cfg, model, total_steps=4, log=lambda msg: None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        driver.attach_optimizer(opt)
        return model, driver, opt

    model, driver, opt = build()
    assert driver.harden_step == 4 and driver.gates.schedule == "npn"
    gate_ids = {id(p) for p in driver.gates.gate_parameters()}
    assert not gate_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    model.train()
    for step in range(3):
        assert driver.before_step(step, opt) is False
        loss = model(x).square().mean()
        (loss + driver.penalty()).backward()
        driver.after_backward(loss, lambda: model(x).square().mean())
        opt.step(), driver.optimizer_step()
        opt.zero_grad()
    state = driver.state_dict()
    # a fresh driver restores the gate state, its Adam and the multipliers exactly
    model2, driver2, opt2 = build()
    model2.load_state_dict(model.state_dict())
    driver2.prepare_restore(state, opt2)
    driver2.load_state_dict(state)
    assert torch.equal(driver2.gates.multipliers, driver.gates.multipliers)
    assert driver2.gate_optimizer.state_dict()["state"].keys() == driver.gate_optimizer.state_dict()["state"].keys()
    # harden at the end (--harden-at 1), then a checkpoint taken after hardening restores without gates
    assert driver.before_step(4, opt) is True and driver.hardened
    assert driver.epoch_stats(model)["gate_expected_ratio"] == pytest.approx(0.3, abs=0.005)
    after = driver.state_dict()
    model3, driver3, opt3 = build()
    driver3.prepare_restore(after, opt3)
    model3.load_state_dict(model.state_dict())
    opt3.load_state_dict(opt.state_dict())
    driver3.load_state_dict(after)
    assert driver3.hardened and driver3.penalty() is None and not hasattr(model3[0], "mode_gate")
    other = TrainConfig(variant="pad", partition="gates", ratio=0.4, gate_estimator="arm").validate()
    model4 = _convnet(11)
    with pytest.raises(ValueError, match="same gate settings"):
        GateDriver(other, model4, total_steps=4, log=print).load_state_dict(state)
