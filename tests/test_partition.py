"""Mode partition (issue 3): IMP against an autograd reference, ratios, structure, schedules, errors."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers import DynamicConv2d, MoEFeedForward, pad_layers
from padnet.transforms.partition import (
    GroupStats,
    PartitionReport,
    SymmetricModesWarning,
    get_criterion,
    list_criteria,
    list_schedules,
    partition_,
    register_criterion,
    unregister_criterion,
)
from padnet.transforms.partition.units import round_half_up


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """Two PAD convs (one with bias) and a linear head."""

    def __init__(self, dtype=torch.float64, num_kernels=3):
        super().__init__()
        self.conv1 = DynamicConv2d(3, 6, 3, padding=1, bias=True, num_kernels=num_kernels, reduction=1, dtype=dtype)
        self.conv2 = DynamicConv2d(6, 5, 3, padding=1, num_kernels=num_kernels, reduction=1, dtype=dtype)
        self.fc = nn.Linear(5, 4, dtype=dtype)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x)
        return self.fc(x.mean(dim=(2, 3)))


class ConvMoENet(nn.Module):
    """A PAD conv feeding a PAD MoE FFN: both layer types in one model."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.conv = DynamicConv2d(3, 8, 3, padding=1, bias=True, num_kernels=3, reduction=1, dtype=dtype)
        self.moe = MoEFeedForward(8, 12, num_experts=3, top_k=2, dtype=dtype)
        self.head = nn.Linear(8, 4, dtype=dtype)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(h + self.moe(h))


def make_model(cls=TinyConvNet, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(**kw)
    with torch.no_grad():  # distinct scales so lambda_s != lambda_d
        for i, (_, layer) in enumerate(pad_layers(model)):
            layer.scale.phi.fill_(0.3 * (i + 1))
    return model


def make_batches(n=2, b=4, size=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 4, (b,), generator=g))
            for _ in range(n)]


def masks_of(model):
    return {f"{n}:{g.name}": g.mask.detach().clone() for n, layer in pad_layers(model) for g in layer.mode_groups()}


def total_entries(model):
    return sum(g.mask.numel() for _, layer in pad_layers(model) for g in layer.mode_groups())


def dynamic_entries(model):
    return sum(int(g.mask.sum()) for _, layer in pad_layers(model) for g in layer.mode_groups())


CE = F.cross_entropy


# --------------------------------------------------------------------------------------------
# explicit autograd reference
# --------------------------------------------------------------------------------------------


def ref_routing(conv, x):
    pooled = x.mean(dim=(2, 3))
    logits = F.linear(F.relu(F.linear(pooled, conv.attention.fc1.weight, conv.attention.fc1.bias)),
                      conv.attention.fc2.weight, conv.attention.fc2.bias)
    return torch.softmax(logits / conv.temperature, dim=-1)


def ref_conv(conv, x, mw, mb=None, w_hat_leaves=None):
    """Per-sample W_hat built by hand from the raw parameters; one F.conv2d per sample."""
    pi = ref_routing(conv, x)
    lambda_d = 2 * torch.sigmoid(conv.scale.phi)
    lambda_s = 2 - lambda_d
    w_hat = lambda_d * mw * torch.einsum("bk,koihw->boihw", pi, conv.weight_dynamic) \
        + lambda_s * (1 - mw) * conv.weight_static
    if w_hat_leaves is not None:  # replace by leaves to read dL/dW_hat
        w_hat_leaves.append(w_hat.detach().requires_grad_(True))
        w_hat = w_hat_leaves[-1]
    bias = None
    if mb is not None:
        bias = lambda_d * mb * (pi @ conv.bias_dynamic) + lambda_s * (1 - mb) * conv.bias_static
    outs = [F.conv2d(x[i:i + 1], w_hat[i], None if bias is None else bias[i], padding=conv.padding)
            for i in range(x.shape[0])]
    return torch.cat(outs), pi


def ref_forward(model, x, m, w_hat_leaves=None):
    h, _ = ref_conv(model.conv1, x, m["conv1:weight"], m["conv1:bias"], w_hat_leaves)
    h, _ = ref_conv(model.conv2, F.relu(h), m["conv2:weight"])
    return model.fc(h.mean(dim=(2, 3)))


def test_taylor_one_shot_equals_autograd_reference_topk():
    model = make_model()
    batches = make_batches(n=3)
    ref_model = copy.deepcopy(model)
    masks = {k: torch.ones_like(v, requires_grad=True) for k, v in masks_of(model).items()}
    names = list(masks)
    total = {k: torch.zeros_like(v) for k, v in masks.items()}
    for x, y in batches:
        loss = CE(ref_forward(ref_model, x, masks), y)
        for k, g in zip(names, torch.autograd.grad(loss, [masks[k] for k in names])):
            total[k] += g
    flat = torch.cat([total[k].abs().reshape(-1) for k in names])
    kappa = 0.37
    n_keep = round_half_up(kappa * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, n_keep).indices] = True
    expected, start = {}, 0
    for k in names:
        expected[k] = keep[start:start + masks[k].numel()].reshape(masks[k].shape)
        start += masks[k].numel()

    report = partition_(model, batches, CE, ratio=kappa, criterion="taylor", iterations=1)
    got = masks_of(model)
    for k in names:
        assert torch.equal(got[k].bool(), expected[k]), k
    assert report.dynamic_entries == n_keep == dynamic_entries(model)
    assert report.num_batches == 3


def test_design_formula_matches_autograd_mask_grad():
    """dL/dM_j = sum_b (lambda_d sum_k pi_bk W_kj - lambda_s W_sj) dL/dW_hat_bj, for conv1's weight."""
    model = make_model()
    batches = make_batches(n=2)
    captured = {}

    def capture(group, stats, layer):
        captured[(stats.layer_name, group.name)] = stats.mask_grad.clone()
        return stats.mask_grad.abs()

    crit = register_criterion("_capture_test", capture, needs_data=True, needs=("mask_grad",))
    try:
        partition_(model, batches, CE, ratio=1.0, criterion="_capture_test", iterations=1)
    finally:
        unregister_criterion("_capture_test")
    assert crit is capture
    conv = model.conv1
    formula = torch.zeros_like(conv.mode_mask)
    m = {k: v for k, v in masks_of(model).items()}
    lambda_d = 2 * torch.sigmoid(conv.scale.phi.detach())
    lambda_s = 2 - lambda_d
    for x, y in batches:
        leaves = []
        loss = CE(ref_forward(model, x, m, w_hat_leaves=leaves), y)
        (g_hat,) = torch.autograd.grad(loss, leaves)
        pi = ref_routing(conv, x).detach()
        mixed = torch.einsum("bk,koihw->boihw", pi, conv.weight_dynamic.detach())
        formula += ((lambda_d * mixed - lambda_s * conv.weight_static.detach()) * g_hat).sum(0)
    torch.testing.assert_close(captured[("conv1", "weight")], formula, rtol=1e-9, atol=1e-12)
    assert captured[("conv1", "weight")].abs().sum() > 0


def test_conv_and_moe_ranked_together_globally():
    model = make_model(ConvMoENet)
    batches = make_batches(n=2, b=5)
    ref = copy.deepcopy(model)
    groups = [(n, g) for n, layer in pad_layers(ref) for g in layer.mode_groups()]
    assert {g.name for _, g in groups} >= {"weight", "bias", "in", "out", "bias_in", "bias_out"}
    for _, g in groups:
        g.mask.requires_grad_(True)
    total = [torch.zeros_like(g.mask) for _, g in groups]
    for x, y in batches:
        grads = torch.autograd.grad(CE(ref(x), y), [g.mask for _, g in groups])
        total = [t + gr for t, gr in zip(total, grads)]
    flat = torch.cat([t.abs().reshape(-1) for t in total])
    n_keep = round_half_up(0.25 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.topk(flat, n_keep).indices] = True

    report = partition_(model, batches, CE, ratio=0.25, iterations=1)
    got = torch.cat([g.mask.reshape(-1).bool() for _, layer in pad_layers(model) for g in layer.mode_groups()])
    assert torch.equal(got, expected)
    assert {r.type for r in report.layers} == {"DynamicConv2d", "MoEFeedForward"}
    assert report.dynamic_entries == n_keep
    # ranked together: the two layers end at different ratios, not 0.25 each
    assert report.layers[0].ratio_after != report.layers[1].ratio_after


# --------------------------------------------------------------------------------------------
# ratios, structure, schedules, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [0.05, 0.3, 0.5, 0.999, 1.0])
def test_global_ratio_exact(kappa):
    model = make_model(ConvMoENet)
    report = partition_(model, make_batches(n=1), CE, ratio=kappa, iterations=2)
    n = total_entries(model)
    assert dynamic_entries(model) == round_half_up(kappa * n) == report.dynamic_entries
    assert report.ratio == pytest.approx(round_half_up(kappa * n) / n)


def test_layer_scope_ratio_exact_per_layer():
    model = make_model(ConvMoENet)
    report = partition_(model, make_batches(n=1), CE, ratio=0.3, iterations=3, scope="layer")
    for row, (_, layer) in zip(report.layers, pad_layers(model)):
        n = sum(g.mask.numel() for g in layer.mode_groups())
        live = sum(int(g.mask.sum()) for g in layer.mode_groups())
        assert live == round_half_up(0.3 * n) == row.dynamic_entries
        assert row.ratio_before == 1.0


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
def test_schedule_followed_per_iteration(schedule):
    import math

    kappa, T = 0.2, 4
    formulas = {
        "exponential": lambda t: kappa ** (t / T),
        "linear": lambda t: 1 - (1 - kappa) * t / T,
        "cosine": lambda t: kappa + (1 - kappa) * (1 + math.cos(math.pi * t / T)) / 2,
    }
    model = make_model()
    n = total_entries(model)
    report = partition_(model, make_batches(n=1), CE, ratio=kappa, iterations=T, schedule=schedule)
    assert [h.iteration for h in report.history] == [1, 2, 3, 4]
    for h in report.history:
        r = formulas[schedule](h.iteration)
        assert h.target_ratio == pytest.approx(r)
        assert h.kept_entries == round_half_up(r * n)
        assert h.ratio == pytest.approx(round_half_up(r * n) / n)
    assert report.history[-1].kept_entries == round_half_up(kappa * n)
    assert sorted(list_schedules()) == list_schedules() and set(formulas) <= set(list_schedules())


def _check_kernel_structured(mask):
    if mask.dim() == 4:
        assert torch.equal(mask.amax(dim=(2, 3)), mask.amin(dim=(2, 3)))


def _check_channel_structured(mask):
    if mask.dim() > 1:
        flat = mask.reshape(mask.shape[0], -1)
        assert torch.equal(flat.amax(1), flat.amin(1))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_kernel_granularity_is_structured(scope):
    model = make_model(ConvMoENet)
    partition_(model, make_batches(n=1), CE, ratio=0.4, iterations=2, granularity="kernel", scope=scope)
    for _, layer in pad_layers(model):
        for g in layer.mode_groups():
            _check_kernel_structured(g.mask)
    n = total_entries(model)
    assert abs(dynamic_entries(model) - round_half_up(0.4 * n)) <= 9 * (1 if scope == "global" else 2)
    assert 0 < model.conv.mode_mask.sum() < model.conv.mode_mask.numel()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_channel_granularity_is_structured_and_bias_follows_channel(scope):
    model = make_model(TinyConvNet)
    partition_(model, make_batches(n=1), CE, ratio=0.5, iterations=2, granularity="channel", scope=scope)
    conv1 = model.conv1
    for _, layer in pad_layers(model):
        for g in layer.mode_groups():
            _check_channel_structured(g.mask)
    assert torch.equal(conv1.bias_mode_mask, conv1.mode_mask[:, 0, 0, 0])
    unit = max(conv1.mode_mask[0].numel() + 1, model.conv2.mode_mask[0].numel())
    assert abs(dynamic_entries(model) - round_half_up(0.5 * total_entries(model))) <= unit * 2
    assert 0 < conv1.mode_mask.sum() or 0 < model.conv2.mode_mask.sum()


def test_channel_granularity_moe():
    model = make_model(ConvMoENet)
    partition_(model, None, None, ratio=0.5, criterion="magnitude", iterations=1, granularity="channel")
    moe = model.moe
    for g in moe.mode_groups():
        _check_channel_structured(g.mask)
    assert torch.equal(moe.mode_mask_bias_in, moe.mode_mask_in[:, 0])
    assert torch.equal(moe.mode_mask_bias_out, moe.mode_mask_out[:, 0])


def test_random_same_seed_same_mask():
    a, b, c = make_model(), make_model(), make_model()
    partition_(a, None, None, ratio=0.3, criterion="random", iterations=3, seed=7)
    partition_(b, None, None, ratio=0.3, criterion="random", iterations=3, seed=7)
    partition_(c, None, None, ratio=0.3, criterion="random", iterations=3, seed=8)
    ma, mb, mc = masks_of(a), masks_of(b), masks_of(c)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert any(not torch.equal(ma[k], mc[k]) for k in ma)
    assert dynamic_entries(a) == round_half_up(0.3 * total_entries(a))


def test_taylor_is_deterministic():
    a, b = make_model(ConvMoENet), make_model(ConvMoENet)
    batches = make_batches(n=2)
    partition_(a, batches, CE, ratio=0.3, iterations=3)
    partition_(b, batches, CE, ratio=0.3, iterations=3)
    ma, mb = masks_of(a), masks_of(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("name", ["taylor", "magnitude", "random", "set", "mest", "snip", "sensitivity",
                                  "reversed_sensitivity", "taylor2"])
def test_every_builtin_criterion_exact(name):
    assert name in list_criteria()
    model = make_model(ConvMoENet, dtype=torch.float32)
    crit = get_criterion(name)
    batches = make_batches(n=1, dtype=torch.float32) if crit.needs_data else None
    report = partition_(model, batches, CE if crit.needs_data else None, ratio=0.35, criterion=name, iterations=2)
    assert dynamic_entries(model) == round_half_up(0.35 * total_entries(model))
    assert report.criterion == name
    # monotone criteria never revive: iteration masks are nested
    if crit.monotone:
        assert [h.kept_entries for h in report.history] == sorted([h.kept_entries for h in report.history],
                                                                  reverse=True)


def test_monotone_criteria_never_revive_static_entries():
    model = make_model()
    partition_(model, None, None, ratio=0.5, criterion="random", iterations=1, seed=1)
    before = masks_of(model)
    partition_(model, make_batches(n=1), CE, ratio=0.2, criterion="snip", iterations=3)
    after = masks_of(model)
    for k in before:
        assert not bool((after[k].bool() & ~before[k].bool()).any()), k  # dynamic only where it was
    # taylor re-ranks every entry (FORCE-style): may revive, but the count is exact
    partition_(model, make_batches(n=1), CE, ratio=0.3, criterion="taylor", iterations=2)
    assert dynamic_entries(model) == round_half_up(0.3 * total_entries(model))


def test_mest_manual_formula_and_criterion_kwargs():
    model = make_model()
    seen = {}

    def spy(group, stats, layer):
        seen[(stats.layer_name, group.name)] = stats.dynamic_grad.clone()
        return get_criterion("mest")(group, stats, layer, gamma=0.5)

    partition_(model, make_batches(n=1), CE, ratio=0.5, iterations=1,
               criterion=register_criterion("_spy_mest", spy, needs=("dynamic_grad",)))
    unregister_criterion("_spy_mest")
    w = model.conv2.weight_dynamic.detach()
    g = seen[("conv2", "weight")]
    assert g.shape == w.shape and g.abs().sum() > 0
    expected = (w.abs() + 0.5 * g.abs()).mean(0)
    torch.testing.assert_close(get_criterion("mest")(model.conv2.mode_groups()[0], GroupStats(
        "conv2", "weight", torch.tensor(1.0), torch.tensor(1.0), dynamic_grad=g), model.conv2, gamma=0.5), expected)


# --------------------------------------------------------------------------------------------
# custom criteria, report, symmetric trap, data handling, state restoration
# --------------------------------------------------------------------------------------------


def test_custom_criterion_registry():
    @register_criterion("_by_index")
    def by_index(group, stats, layer):
        return -torch.arange(group.mask.numel(), dtype=torch.float32).reshape(group.shape)

    try:
        assert "_by_index" in list_criteria()
        assert not get_criterion("_by_index").needs_data
        model = make_model()
        partition_(model, None, None, ratio=0.5, criterion="_by_index", iterations=1)
        # every group keeps its lowest flat indices; all groups score the same range, ties by global index
        assert model.conv1.mode_mask.reshape(-1)[0] == 1
        with pytest.raises(ValueError, match="already registered"):
            register_criterion("_by_index", lambda g, s, l: g.mask)
        register_criterion("_by_index", by_index)  # same function: idempotent
    finally:
        unregister_criterion("_by_index")
    assert "_by_index" not in list_criteria()

    model = make_model()
    bad = register_criterion("_bad_shape", lambda g, s, l: torch.zeros(3))
    try:
        with pytest.raises(ValueError, match="expected a tensor of shape"):
            partition_(model, None, None, ratio=0.5, criterion="_bad_shape")
    finally:
        unregister_criterion("_bad_shape")
    assert callable(bad)


def test_report_json_round_trip(tmp_path):
    model = make_model(ConvMoENet)
    report = partition_(model, make_batches(n=1), CE, ratio=0.3, iterations=3)
    path = tmp_path / "sub" / "report.json"
    text = report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text) == report.to_dict()
    again = PartitionReport.from_json(path)
    assert again == report
    assert PartitionReport.from_json(text) == report
    d = report.to_dict()
    assert d["criterion"] == "taylor" and d["schedule"] == "exponential" and d["iterations"] == 3
    assert d["size_after"]["total"] < d["size_before"]["total"]
    assert [row["name"] for row in d["layers"]] == ["conv", "moe"]
    assert set(d["layers"][0]) >= {"name", "type", "entries", "ratio_before", "ratio_after"}
    assert d["seconds"] > 0
    s = str(report)
    assert "TOTAL" in s and "MoEFeedForward" in s and "kept ratio per iteration" in s
    with pytest.raises(ValueError, match="unknown PartitionReport keys"):
        PartitionReport.from_dict({**d, "bogus": 1})


def _symmetric_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 4),
    ).double()
    model[2] = DynamicConv2d.from_conv(model[2], num_kernels=3, noise_std=0.0)
    return model


def test_symmetric_modes_warn_and_are_recorded():
    model = _symmetric_model()
    batches = make_batches(n=1)
    with pytest.warns(SymmetricModesWarning, match="noise_std"):
        report = partition_(model, batches, CE, ratio=0.5, iterations=2)
    assert report.symmetric_layers == ["2"]
    assert report.layers[0].symmetric and report.warnings
    first = masks_of(model)
    # deterministic: same call, same mask (index order, not float noise)
    model2 = _symmetric_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report2 = partition_(model2, batches, CE, ratio=0.5, iterations=2, warn_symmetric=False)
    assert report2.symmetric_layers == ["2"]
    assert all(torch.equal(first[k], masks_of(model2)[k]) for k in first)
    assert dynamic_entries(model2) == round_half_up(0.5 * total_entries(model2))
    # magnitude is zero on symmetric layers too
    with pytest.warns(SymmetricModesWarning):
        partition_(_symmetric_model(), None, None, ratio=0.5, criterion="magnitude")


def test_symmetric_moe_upcycled_without_noise_warns():
    fc_in, fc_out = nn.Linear(6, 10), nn.Linear(10, 6)
    moe = MoEFeedForward.from_dense(fc_in, fc_out, num_experts=3, noise_std=0.0)
    model = nn.Sequential(moe, nn.Linear(6, 4))
    x = torch.randn(5, 6)
    with pytest.warns(SymmetricModesWarning):
        report = partition_(model, [(x, torch.randint(0, 4, (5,)))], CE, ratio=0.4, iterations=1)
    assert report.symmetric_layers == ["0"]


def test_noisy_model_does_not_warn():
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = partition_(model, make_batches(n=1), CE, ratio=0.5, iterations=1)
    assert report.symmetric_layers == [] and report.warnings == []


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, image, scale=1.0):
        return self.net(image) * scale


def test_dict_inputs_and_one_shot_iterator():
    model = KwModel()
    batches = make_batches(n=3)
    consumed = []

    def gen():
        for x, y in batches:
            consumed.append(1)
            yield {"image": x, "scale": 2.0}, y

    report = partition_(model, gen(), CE, ratio=0.4, iterations=3, num_batches=2)
    assert report.num_batches == 2 and len(consumed) == 2  # materialised once, first 2 only
    assert len(report.history) == 3
    assert dynamic_entries(model) == round_half_up(0.4 * total_entries(model))
    # re-iterable + num_batches
    report = partition_(make_model(), batches, CE, ratio=0.4, iterations=2, num_batches=1)
    assert report.num_batches == 1


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = DynamicConv2d(3, 4, 3, padding=1, num_kernels=2, reduction=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


@pytest.mark.parametrize("train_mode", [False, True])
def test_state_restored(train_mode):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.fc.eval()  # mixed flags must come back as they were
    model.conv.weight_dynamic.requires_grad_(False)  # frozen: snip needs its grad, must be re-frozen
    marker = torch.full_like(model.fc.weight, 3.0)
    model.fc.weight.grad = marker
    model.conv.weight_static.grad = None
    bn_before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    batches = [(torch.randn(4, 3, 5, 5), torch.randint(0, 4, (4,)))]
    rng_before = torch.get_rng_state()
    for crit in ("taylor", "snip"):
        partition_(model, batches, CE, ratio=0.5, iterations=2, criterion=crit, train_mode=train_mode)
    assert model.training and model.conv.training and model.bn.training and not model.fc.training
    assert model.fc.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 3.0))
    assert model.conv.weight_static.grad is None and model.conv.weight_dynamic.grad is None
    assert not model.conv.weight_dynamic.requires_grad and model.conv.weight_static.requires_grad
    assert not model.conv.mode_mask.requires_grad
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, bn_before[k]), k
    if train_mode:
        assert torch.equal(torch.get_rng_state(), rng_before)


def test_masks_restored_when_the_call_fails():
    model = make_model()
    before = masks_of(model)
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return CE(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        partition_(model, make_batches(n=1), flaky, ratio=0.3, iterations=3)
    after = masks_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.conv1.mode_mask.requires_grad


def test_magnitude_partition_helper_of_the_cli_still_works():
    from padnet.commands.common import make_variant
    from padnet.models import create_model

    model = make_variant(create_model("resnet10", small_input=True, width=0.25, num_classes=5), "pad", 0.3)
    n = total_entries(model)
    assert dynamic_entries(model) == round_half_up(0.3 * n)


def test_magnitude_formula():
    model = make_model()
    conv = model.conv2
    g = conv.mode_groups()[0]
    lambda_s, lambda_d = (s.detach() for s in conv.scales())
    st = GroupStats("conv2", "weight", lambda_s, lambda_d)
    expected = (lambda_d * conv.weight_dynamic - lambda_s * conv.weight_static).abs().mean(0).detach()
    torch.testing.assert_close(get_criterion("magnitude")(g, st, conv), expected)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        partition_(make_model(), None, None, ratio=ratio, criterion="magnitude")


def test_bad_inputs():
    model = make_model()
    batches = make_batches(n=1)
    with pytest.raises(TypeError):
        partition_(model, None, None, ratio="0.3", criterion="magnitude")
    with pytest.raises(ValueError, match="registered criteria: .*taylor"):
        partition_(model, batches, CE, ratio=0.3, criterion="nope")
    with pytest.raises(ValueError, match="registered schedules: .*exponential"):
        partition_(model, batches, CE, ratio=0.3, schedule="nope")
    with pytest.raises(ValueError, match="unknown scope .*global"):
        partition_(model, batches, CE, ratio=0.3, scope="model")
    with pytest.raises(ValueError, match="unknown granularity .*kernel"):
        partition_(model, batches, CE, ratio=0.3, granularity="block")
    with pytest.raises(ValueError, match="batches yielded no data"):
        partition_(model, [], CE, ratio=0.3)
    with pytest.raises(ValueError, match="batches yielded no data"):
        partition_(model, iter([]), CE, ratio=0.3)
    with pytest.raises(ValueError, match="dynamize_ first"):
        partition_(nn.Sequential(nn.Linear(3, 3)), None, None, ratio=0.3, criterion="magnitude")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="iterations"):
            partition_(model, batches, CE, ratio=0.3, iterations=bad)
    with pytest.raises(TypeError, match="iterations"):
        partition_(model, batches, CE, ratio=0.3, iterations=2.5)
    with pytest.raises(ValueError, match="needs data"):
        partition_(model, None, None, ratio=0.3, criterion="taylor")
    with pytest.raises(ValueError, match="loss_fn"):
        partition_(model, batches, None, ratio=0.3, criterion="snip")
    with pytest.raises(ValueError, match="num_batches"):
        partition_(model, batches, CE, ratio=0.3, num_batches=0)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        partition_(model, [batches[0][0]], CE, ratio=0.3)
    with pytest.raises(ValueError, match="scalar"):
        partition_(model, batches, lambda out, y: F.cross_entropy(out, y, reduction="none"), ratio=0.3)
    with pytest.raises(ValueError, match="does not depend"):
        partition_(model, batches, lambda out, y: CE(out.detach(), y), ratio=0.3)
    with pytest.raises(TypeError, match="nn.Module"):
        partition_(object(), None, None, ratio=0.3, criterion="magnitude")
    # nothing changed by the failed calls
    assert dynamic_entries(model) == total_entries(model)


class MaskSkippingConv(DynamicConv2d):
    """A broken PAD layer: its forward ignores the mask (a fast path without the autograd fallback)."""

    def forward(self, x):
        return F.conv2d(x, self.weight_static * self.scales()[0], None, self.stride, self.padding)


def test_layer_that_skips_its_mask_is_refused_not_silently_zero():
    torch.manual_seed(0)
    model = nn.Sequential(MaskSkippingConv(3, 4, 3, padding=1, num_kernels=2, dtype=torch.float64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="does not multiply by its mode mask"):
        partition_(model, make_batches(n=1), CE, ratio=0.5, iterations=1)
    assert dynamic_entries(model) == total_entries(model) and not model[0].mode_mask.requires_grad
    # data-free criteria do not need the mask in the graph
    partition_(model, None, None, ratio=0.5, criterion="magnitude")


def test_unused_pad_layer_scores_zero_and_is_reported():
    model = make_model()
    model.unused = DynamicConv2d(3, 2, 1, num_kernels=2, dtype=torch.float64)
    with pytest.warns(SymmetricModesWarning, match="exactly zero"):
        report = partition_(model, make_batches(n=1), CE, ratio=0.5, iterations=1)
    assert report.symmetric_layers == ["unused"]
    assert model.unused.mode_mask.sum() == 0  # zero scores rank last under global scope
