"""Function-preserving mode transitions, routing statistics, fair initialisation (issue 11)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.moe import MoEFeedForward
from padnet.partition import partition_
from padnet.transforms.diagnostics import kernel_spread, measure_routing, routing_probe, summarize_routing
from padnet.transforms.transitions import ModeTransition, reset_optimizer_state_, set_modes_, transition_factors

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, routing="softmax", bias=True, k=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = DynamicConv2d(6, 8, 3, padding=1, bias=bias, num_kernels=k, reduction=1, routing=routing)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = DynamicConv2d(8, 8, 3, padding=1, bias=bias, num_kernels=k, reduction=1, routing=routing)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.bn(self.conv1(h)))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def batches(n=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


def train_steps(model, data, steps=6, opt=None, lr=0.05):
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def random_masks(model, p=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (DynamicConv2d, MoEFeedForward)):
            out[name] = {gr.name: (torch.rand(gr.shape, generator=g) < p).float() for gr in layer.mode_groups()}
    return out


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) or (a[k].is_floating_point() and a[k].shape == b[k].shape
                                           and torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True))
        assert same, k


# ---------------------------------------------------------------------------- static -> dynamic


@pytest.mark.parametrize("bias", [True, False])
def test_static_to_dynamic_is_exact_on_a_trained_model(bias):
    torch.manual_seed(0)
    model = Net(bias=bias)
    for _, layer in model.named_modules():
        if isinstance(layer, DynamicConv2d):
            layer.set_all_modes(False)  # a trained static model
            with torch.no_grad():
                layer.scale.phi.fill_(0.4)  # lambda_s != lambda_d
    data = batches()
    train_steps(model, data)
    model.eval()
    x = data[0][0]
    before = model(x).detach()
    report = set_modes_(model, random_masks(model))
    after = model(x).detach()
    assert report.to_dynamic > 0 and report.to_static == 0
    assert all(r.exact for r in report.layers)
    assert (after - before).norm() / before.norm() < 1e-5
    assert (after - before).abs().max() < 1e-5 * before.abs().max()


def test_static_to_dynamic_moe_is_exact_for_any_gates():
    torch.manual_seed(0)
    for normalize in (True, False):
        moe = MoEFeedForward(8, 12, num_experts=4, top_k=2, normalize_gates=normalize).double()
        moe.set_all_modes(False)
        with torch.no_grad():
            moe.scale.phi.fill_(-0.7)
        x = torch.randn(20, 8, dtype=torch.double)
        before = moe(x).detach()
        report = set_modes_(moe, random_masks(moe))
        assert report.to_dynamic > 0 and report.layers[0].exact
        torch.testing.assert_close(moe(x).detach(), before, rtol=1e-12, atol=1e-12)


def test_transition_factors_match_the_formulas_in_float64():
    torch.manual_seed(0)
    k, shape = 3, (4, 5)
    dyn, sta = torch.randn(k, *shape, dtype=torch.double), torch.randn(shape, dtype=torch.double)
    old = (torch.rand(shape) < 0.5).double()
    new = (torch.rand(shape) < 0.5).double()
    mix, ls, ld, total = torch.tensor([0.2, 0.5, 0.3], dtype=torch.double), 0.8, 1.2, 1.7
    new_dyn, new_sta = transition_factors(dyn, sta, old, new, ls, ld, mix, total)
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(5)):
        i, j = int(idx[0]), int(idx[1])
        if old[i, j] == 1 and new[i, j] == 0:
            expected = ld / ls * sum(float(mix[q]) * float(dyn[q, i, j]) for q in range(k))
            assert math.isclose(float(new_sta[i, j]), expected, rel_tol=1e-12, abs_tol=1e-12)
        else:
            assert float(new_sta[i, j]) == float(sta[i, j])
        for q in range(k):
            if old[i, j] == 0 and new[i, j] == 1:
                assert math.isclose(float(new_dyn[q, i, j]), ls / ld * float(sta[i, j]) / total, rel_tol=1e-12)
            else:
                assert float(new_dyn[q, i, j]) == float(dyn[q, i, j])


# ---------------------------------------------------------------------------- dynamic -> static


def test_dynamic_to_static_uses_the_running_mean_routing_weights():
    torch.manual_seed(0)
    model = Net().double()
    data = [(x.double(), y) for x, y in batches()]
    train_steps(model, data, steps=5)
    conv = model.conv1
    pbar = conv.routing_mean.double().clone()
    assert torch.isclose(pbar.sum(), torch.tensor(1.0, dtype=torch.double), atol=1e-6)
    lambda_s, lambda_d = (s.detach() for s in conv.scales())
    w_dyn, w_sta = conv.weight_dynamic.detach().clone(), conv.weight_static.detach().clone()
    masks = random_masks(model)
    set_modes_(model, {"conv1": {"weight": masks["conv1"]["weight"]}})
    turned = masks["conv1"]["weight"] == 0
    expected = lambda_d / lambda_s * torch.einsum("k,k...->...", pbar / pbar.sum(), w_dyn)
    torch.testing.assert_close(conv.weight_static.detach()[turned], expected[turned], rtol=1e-6, atol=1e-9)
    assert torch.equal(conv.weight_static.detach()[~turned], w_sta[~turned])
    assert torch.equal(conv.weight_dynamic.detach(), w_dyn)  # nothing turned dynamic (mask was all ones)
    assert torch.equal(conv.mode_mask, masks["conv1"]["weight"])


def test_dynamic_to_static_is_exact_for_input_independent_routing_and_sigmoid_uses_the_sum():
    torch.manual_seed(0)
    for routing in ("softmax", "sigmoid"):
        conv = DynamicConv2d(4, 6, 3, padding=1, bias=True, num_kernels=3, routing=routing).double()
        with torch.no_grad():  # routing no longer depends on the input: pi = const
            conv.attention.fc2.weight.zero_()
            conv.attention.fc2.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
            conv.scale.phi.fill_(0.3)
        conv.train()
        conv(torch.randn(4, 4, 5, 5, dtype=torch.double))
        conv.eval()
        x = torch.randn(6, 4, 5, 5, dtype=torch.double)
        before = conv(x).detach()
        mask = (torch.rand(conv.mode_mask.shape) < 0.3).double()
        report = set_modes_(conv, {"": {"weight": mask, "bias": torch.zeros(6, dtype=torch.double)}})
        assert report.to_static > 0 and not report.layers[0].exact  # dynamic -> static: approximate in general
        torch.testing.assert_close(conv(x).detach(), before, rtol=1e-5, atol=1e-6)
        # and back: static -> dynamic (sigmoid divides by the mean sum of weights)
        set_modes_(conv, {"": {"weight": torch.ones_like(mask), "bias": torch.ones(6, dtype=torch.double)}})
        torch.testing.assert_close(conv(x).detach(), before, rtol=1e-5, atol=1e-6)


def test_dynamic_to_static_moe_folds_experts_by_mean_gate():
    torch.manual_seed(0)
    moe = MoEFeedForward(6, 8, num_experts=3, top_k=1, bias=True).double()
    moe.train()
    moe(torch.randn(30, 6, dtype=torch.double))
    gates = moe.routing_mean.double()
    assert torch.isclose(gates.sum(), torch.tensor(1.0, dtype=torch.double))  # normalised top-1 gates
    ls, ld = (s.detach() for s in moe.scales())
    experts = moe.experts_in.detach().clone()
    set_modes_(moe, {"": {"in": torch.zeros(8, 6)}})
    torch.testing.assert_close(moe.static_in.detach(), ld / ls * torch.einsum("e,e...->...", gates, experts))


def test_preserve_false_changes_only_masks():
    torch.manual_seed(0)
    model = Net()
    train_steps(model, batches(), steps=3)
    before = state(model)
    masks = random_masks(model)
    report = set_modes_(model, masks, preserve=False)
    assert not report.preserve and not any(r.exact for r in report.layers)
    after = state(model)
    for k in before:
        if "mode_mask" in k:
            continue
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------------------- staged use


def test_staged_transitions_start_from_the_reference_and_roll_back():
    torch.manual_seed(0)
    model = Net()
    train_steps(model, batches(), steps=3)
    before = state(model)
    session = ModeTransition(model)
    session.set_masks({"conv1": {"weight": torch.zeros(8, 6, 3, 3)}})
    assert not torch.equal(model.conv1.weight_static.detach(), before["conv1.weight_static"])
    session.set_masks({"conv1": {"weight": torch.ones(8, 6, 3, 3)}})  # back: the original kernels, exactly
    assert_state_equal(state(model), before)
    session.set_masks({"conv1": {"weight": torch.zeros(8, 6, 3, 3)}})
    session.rollback()
    assert_state_equal(state(model), before)
    with pytest.raises(RuntimeError, match="already"):
        session.set_masks({})


def test_partition_preserves_the_function_of_a_trained_model():
    torch.manual_seed(0)
    data = batches(n=4, b=16)
    model = Net()
    train_steps(model, data, steps=20, lr=0.1)
    model.eval()
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        out0 = model(x)
    change = {}
    for preserve in (True, False):
        m = Net()
        m.load_state_dict(model.state_dict())
        rep = partition_(m, data, nn.CrossEntropyLoss(), ratio=0.3, iterations=3, preserve=preserve)
        assert rep.transition["preserve"] is preserve and rep.transition["to_static"] > 0
        m.eval()
        with torch.no_grad():
            change[preserve] = float((m(x) - out0).norm() / out0.norm())
    # routing at temperature 1 varies a lot across inputs here, so the fold is approximate: measured 6.5x;
    # the 10x target of issue 11 is measured on a trained ResNet-10 in docs/partition.md
    assert change[True] * 4 < change[False], change


def test_partition_failure_restores_factors_too():
    torch.manual_seed(0)
    model = Net()
    train_steps(model, batches(), steps=3)
    before = state(model)
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) > 2:  # fails in iteration 3, after two iterations changed masks and factors
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        partition_(model, batches(n=1), flaky, ratio=0.3, iterations=3)
    assert_state_equal(state(model), before)


# ---------------------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_of_changed_entries_is_reset(kind):
    torch.manual_seed(0)
    data = batches()
    model = Net()
    # weight decay: dead static copies then carry state too (as in real training)
    make = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)) if kind == "sgd" else (
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3))
    opt = make(model.parameters())
    train_steps(model, data, steps=4, opt=opt)
    conv = model.conv1
    old_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (conv.weight_static,
                                                                                 conv.weight_dynamic)}
    mask = (torch.rand(conv.mode_mask.shape) < 0.5).float()
    report = set_modes_(model, {"conv1": {"weight": mask}}, optimizer=opt)
    changed = mask == 0
    assert report.optimizer_entries_reset == int(changed.sum()) * (1 + conv.num_kernels)
    keys = ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"]
    for p, where in ((conv.weight_static, changed), (conv.weight_dynamic, changed.expand_as(conv.weight_dynamic))):
        for key in keys:
            now, was = opt.state[p][key], old_state[id(p)][key]
            assert not bool(now[where].any()), key  # no stale state in the new mode
            assert torch.equal(now[~where], was[~where]), key  # the rest untouched
            assert bool(was[where].any())
    # the next step of a changed entry equals that of a fresh optimizer with the same gradient
    x, y = data[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = conv.weight_static.grad.detach().clone()
    w0 = conv.weight_static.detach().clone()
    opt.step()
    probe = torch.nn.Parameter(w0.clone())
    probe.grad = grad
    fresh = make([probe])
    if kind == "adam":  # Adam's step counter is per tensor: a reset entry shares it (documented)
        fresh.step()
        fresh.state[probe]["exp_avg"].zero_()
        fresh.state[probe]["exp_avg_sq"].zero_()
        fresh.state[probe]["step"].copy_(opt.state[conv.weight_static]["step"] - 1)
        with torch.no_grad():
            probe.copy_(w0)
    fresh.step()
    torch.testing.assert_close(conv.weight_static.detach()[changed], probe.detach()[changed])


def test_reset_optimizer_state_without_state_is_a_no_op():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    assert reset_optimizer_state_(opt, p, torch.ones(3, dtype=torch.bool)) == 0
    assert reset_optimizer_state_(None, p, torch.ones(3, dtype=torch.bool)) == 0


# ---------------------------------------------------------------------------- bad input


def _bad_cases(model):
    good = {gr.name: torch.zeros(gr.shape) for gr in model.conv2.mode_groups()}
    return [
        ({"conv2": good, "conv1": {"weight": torch.zeros(3, 3)}}, ValueError, "conv1.*shape"),
        ({"conv2": good, "conv1": {"weight": torch.full((8, 6, 3, 3), 0.5)}}, ValueError, "conv1.*0 or 1"),
        ({"conv2": good, "nope": {"weight": torch.zeros(1)}}, KeyError, "no PAD layer 'nope'"),
        ({"conv2": good, "conv1": {"gate": torch.zeros(1)}}, KeyError, "conv1.*no mode group 'gate'"),
    ]


def test_bad_masks_raise_and_change_nothing():
    torch.manual_seed(0)
    model = Net()
    train_steps(model, batches(), steps=2)
    before = state(model)
    for masks, exc, match in _bad_cases(model):
        with pytest.raises(exc, match=match):
            set_modes_(model, masks)
        assert_state_equal(state(model), before)


def test_zero_lambda_and_nan_statistics_raise_naming_the_layer():
    torch.manual_seed(0)
    model = Net()
    train_steps(model, batches(), steps=2)
    with torch.no_grad():
        model.conv1.scale.phi.fill_(float("inf"))  # lambda_d = 2, lambda_s = 0
    before = state(model)
    masks = {"conv2": {"weight": torch.zeros(8, 8, 3, 3)}, "conv1": {"weight": torch.zeros(8, 6, 3, 3)}}
    with pytest.raises(ValueError, match="'conv1'.*lambda_s = 0"):
        set_modes_(model, masks)
    assert_state_equal(state(model), before)
    set_modes_(model, masks, preserve=False)  # masks only: no division, allowed
    with torch.no_grad():
        model.conv1.scale.phi.fill_(0.0)
        model.conv2.routing_mean[1] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match="'conv2'.*NaN"):
        set_modes_(model, {"conv1": {"weight": torch.ones(8, 6, 3, 3)}, "conv2": {"bias": torch.zeros(8)}})
    assert_state_equal(state(model), before)
    with pytest.raises(ValueError, match="routing\\['conv1'\\]"):
        set_modes_(model, {}, routing={"conv1": torch.tensor([1.0, float("nan"), 0.0])})


def test_compact_models_are_refused():
    from padnet.export import compact_

    torch.manual_seed(0)
    model = Net()
    compact_(model)
    with pytest.raises(ValueError, match="compact"):
        set_modes_(model, {"conv1": {"weight": torch.zeros(8, 6, 3, 3)}})


# ---------------------------------------------------------------------------- routing statistics


def test_routing_mean_is_the_exact_mean_early_and_only_in_training():
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, num_kernels=3)
    xs = [torch.randn(5, 4, 6, 6) for _ in range(3)]
    conv.eval()
    conv(xs[0])
    assert int(conv.routing_updates) == 0 and torch.allclose(conv.routing_mean, torch.full((3,), 1 / 3))
    conv.train()
    means = []
    for x in xs:
        conv(x)
        means.append(conv.routing_weights(x).detach().mean(0))
    assert int(conv.routing_updates) == 3
    torch.testing.assert_close(conv.routing_mean, torch.stack(means).mean(0))
    # files without the statistics (written before they existed) load with the initial values
    sd = conv.state_dict()
    del sd["routing_mean"], sd["routing_updates"]
    fresh = DynamicConv2d(4, 6, 3, num_kernels=3)
    fresh.load_state_dict(sd)
    assert int(fresh.routing_updates) == 0


def test_diagnostics_match_plain_computations():
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, num_kernels=3).double()
    x = torch.randn(7, 4, 5, 5, dtype=torch.double)
    with routing_probe(conv) as got:
        conv(x)
    pi = conv.routing_weights(x).detach()
    s = summarize_routing(got[""])
    expected_h = float((-(pi * pi.log()).sum(1)).mean())
    assert math.isclose(s["entropy"], expected_h, rel_tol=1e-6)
    assert math.isclose(s["pi_std"], float(pi.std(0, unbiased=False).mean()), rel_tol=1e-6)
    w = conv.weight_dynamic.detach().reshape(3, -1) * float(conv.scales()[1].detach())
    cos = [float(F.cosine_similarity(w[i], w[j], dim=0)) for i in range(3) for j in range(3) if i != j]
    assert math.isclose(kernel_spread(conv), sum(1 - c for c in cos) / len(cos), rel_tol=1e-9)
    assert "_routing_probe" not in conv.__dict__
    m = measure_routing(conv, [x])
    torch.testing.assert_close(m[""], pi.float().mean(0))


# ---------------------------------------------------------------------------- initialisation


def test_fresh_init_follows_the_official_code():
    torch.manual_seed(0)
    conv = DynamicConv2d(32, 64, 3, num_kernels=4, reduction=4, bias=True)
    std = math.sqrt(2.0 / (64 * 9))
    for w in (*conv.weight_dynamic, conv.weight_static):
        assert abs(float(w.std()) / std - 1) < 0.05
    corr = torch.corrcoef(conv.weight_dynamic.detach().reshape(4, -1))
    assert float(corr[~torch.eye(4, dtype=torch.bool)].abs().max()) < 0.05  # independent kernels
    assert not conv.bias_dynamic.any() and not conv.bias_static.any()
    wide = DynamicConv2d(256, 8, 1, num_kernels=16, reduction=4)  # enough router weights to estimate a std
    fc1, fc2 = wide.attention.fc1, wide.attention.fc2
    assert abs(float(fc1.weight.std()) / math.sqrt(2.0 / fc1.out_features) - 1) < 0.05
    assert abs(float(fc2.weight.std()) / math.sqrt(2.0 / 16) - 1) < 0.1
    assert not fc1.bias.any() and not fc2.bias.any()
    torch_init = DynamicConv2d(32, 64, 3, num_kernels=4, router_init="torch")
    assert float(torch_init.attention.fc2.weight.abs().max()) <= 1 / math.sqrt(torch_init.attention.fc1.out_features)
    with pytest.raises(ValueError, match="router_init"):
        DynamicConv2d(4, 4, 3, router_init="zeros")


def _relative_update(layer, x, lr=0.05, steps=3):
    """Mean over steps of ||W_hat(x)_{t+1} - W_hat(x)_t|| / ||W_hat(x)_t|| under SGD, conv followed by BN."""
    bn = nn.BatchNorm2d(layer.out_channels)
    head = nn.Linear(layer.out_channels, 4)
    params = list(layer.parameters()) + list(bn.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (x.shape[0],), generator=g)

    def w_hat():
        if isinstance(layer, nn.Conv2d):
            return layer.weight.detach().clone().unsqueeze(0)
        return layer.aggregated_weight(x).detach().clone()

    out = []
    for _ in range(steps):
        w0 = w_hat()
        opt.zero_grad()
        F.cross_entropy(head(F.relu(bn(layer(x))).mean(dim=(2, 3))), y).backward()
        opt.step()
        out.append(float(((w_hat() - w0).flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1)).mean()))
    return sum(out) / len(out)


def test_fresh_init_dynamic_conv_updates_at_the_rate_of_a_static_conv():
    """Issue 11 target: relative update size within 0.8-1.25x of a static conv's (same optimizer, BN after)."""
    torch.manual_seed(0)
    x = torch.randn(16, 16, 8, 8)
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        static = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(static.weight, mode="fan_out", nonlinearity="relu")
        torch.manual_seed(seed)
        fresh = DynamicConv2d.from_conv(static, num_kernels=4, init="fresh", temperature=30.0)
        torch.manual_seed(seed)
        inherit = DynamicConv2d.from_conv(static, num_kernels=4, init="inherit", temperature=30.0)
        ref = _relative_update(static, x)
        ratios.append((_relative_update(fresh, x) / ref, _relative_update(inherit, x) / ref))
    fresh_ratio = sum(r[0] for r in ratios) / len(ratios)
    inherit_ratio = sum(r[1] for r in ratios) / len(ratios)
    assert 0.8 <= fresh_ratio <= 1.25, ratios
    assert inherit_ratio < 0.5, ratios  # the measured handicap of inherited (identical) kernels: ~1/K
