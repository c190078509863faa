"""Routing variants of the MoE layers: sigmoid, noisy top-k, cv^2 / Switch / z losses,
auxiliary-loss-free bias balancing, load statistics and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.layers import CompactMoEFeedForward, MoEFeedForward, collect_aux_loss
from padnet.layers.moe import expert_load_stats, summarize_expert_load, update_expert_biases
from padnet.ops.moe_routing import cv_squared, noisy_top_k_load, route_tokens, router_z_loss

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, E = 8, 12, 4


def make(seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoEFeedForward(H, I, **{"num_experts": E, "top_k": 2, **kw})
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.5)
    return moe


# ------------------------------------------------------------------------------ route_tokens


def test_sigmoid_scores_renormalised_over_the_top_k():
    logits = torch.randn(7, E, dtype=torch.double)
    idx, gates, scores = route_tokens(logits, 2, score="sigmoid")
    s = torch.sigmoid(logits)
    torch.testing.assert_close(scores, s)
    ref_idx = torch.topk(s, 2, dim=-1).indices
    assert torch.equal(idx, ref_idx)
    chosen = s.gather(1, ref_idx)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    _, raw, _ = route_tokens(logits, 2, normalize_gates=False, score="sigmoid")
    torch.testing.assert_close(raw, chosen)


def test_selection_bias_changes_the_choice_not_the_gate_values():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]], dtype=torch.double)
    bias = torch.tensor([-10.0, 0.0, 0.0, 0.0])
    idx, gates, probs = route_tokens(logits, 2, selection_bias=bias)
    assert sorted(idx[0].tolist()) == [1, 2]  # expert 0 excluded by its bias
    p = torch.softmax(logits, -1)[0]
    chosen = p[idx[0]]
    torch.testing.assert_close(gates[0], chosen / chosen.sum())  # gates from unbiased scores
    with pytest.raises(ValueError, match="unknown router score"):
        route_tokens(logits, 2, score="tanh")


def test_cv_squared_and_z_loss_formulas():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.double)
    mean = v.mean()
    var = ((v - mean) ** 2).sum() / 3  # unbiased
    torch.testing.assert_close(cv_squared(v), var / (mean**2 + 1e-10))
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0
    z = torch.randn(5, E, dtype=torch.double)
    ref = torch.stack([torch.log(torch.exp(r).sum()) ** 2 for r in z]).mean()
    torch.testing.assert_close(router_z_loss(z), ref)


def test_noisy_top_k_load_matches_monte_carlo():
    """P(expert e stays in the top k when only its own noise is redrawn), per token, vs sampling."""
    torch.manual_seed(0)
    n, k = 3, 2
    clean = torch.randn(n, E, dtype=torch.double)
    std = 0.5 + torch.rand(n, E, dtype=torch.double)
    noisy = clean + torch.randn(n, E, dtype=torch.double) * std
    got = noisy_top_k_load(clean, noisy, std, k)
    draws = 200_000
    expected = torch.zeros(E, dtype=torch.double)
    for t in range(n):
        for e in range(E):
            others = torch.cat([noisy[t, :e], noisy[t, e + 1 :]])
            kth_other = torch.topk(others, k).values[-1]
            sample = clean[t, e] + torch.randn(draws, dtype=torch.double) * std[t, e]
            expected[e] += (sample > kth_other).double().mean()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="top_k < num_experts"):
        noisy_top_k_load(clean, noisy, std, E)


# ------------------------------------------------------------------------------ layer losses


def test_switch_loss_of_sigmoid_routing_uses_normalised_scores():
    moe = make(routing="sigmoid", aux_loss_coef=0.5)
    x = torch.randn(20, H)
    moe(x)
    s = torch.sigmoid(moe.router(x).float())
    p = s / s.sum(-1, keepdim=True)
    idx = torch.topk(s, 2, dim=-1).indices
    f = torch.bincount(idx.reshape(-1), minlength=E).float() / (20 * 2)
    torch.testing.assert_close(moe.aux_loss, 0.5 * E * (f * p.mean(0)).sum())


def test_cv2_loss_is_importance_plus_load():
    moe = make(balance_loss="cv2", aux_loss_coef=0.1)
    x = torch.randn(30, H)
    moe(x)
    probs = torch.softmax(moe.router(x).float(), -1)
    top_p, top_i = torch.topk(probs, 2, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    importance = torch.zeros(E).index_add(0, top_i.reshape(-1), gates.reshape(-1))
    load = torch.bincount(top_i.reshape(-1), minlength=E).float()
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    torch.testing.assert_close(moe.aux_loss, 0.1 * (cv2(importance) + cv2(load)))
    assert moe.aux_losses["balance"] == pytest.approx(float((cv2(importance) + cv2(load)).detach()), rel=1e-5)


def test_z_loss_added_with_its_coefficient():
    base = make(aux_loss_coef=0.0, z_loss_coef=1e-3)
    x = torch.randn(10, H)
    base(x)
    torch.testing.assert_close(base.aux_loss, 1e-3 * torch.logsumexp(base.router(x).float(), -1).pow(2).mean())
    assert "z" in base.aux_losses


def test_noisy_routing_eval_is_clean_softmax_and_training_trains_the_noise_scale():
    moe = make(routing="noisy", balance_loss="cv2")
    ref = make(routing="softmax")
    ref.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("router_noise")})
    x = torch.randn(40, H)
    moe.eval(), ref.eval()
    torch.testing.assert_close(moe(x), ref(x))  # no noise at inference
    moe.train()
    torch.manual_seed(1)
    a = moe(x)
    torch.manual_seed(2)
    b = moe(x)
    assert not torch.allclose(a, b)  # noise in training
    assert moe.router_noise.weight.abs().sum() == 0  # zero init, as in the official code
    moe.zero_grad()
    moe.aux_loss.backward()  # the smooth load estimate reaches W_noise
    assert moe.router_noise.weight.grad is not None and moe.router_noise.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ balancing


def _skewed_toy_run(routing: str, balancing: bool, gamma: float = 3e-3, steps: int = 200, seed: int = 0):
    """Toy regression with a router skewed towards expert 0 (logit bias +2); returns the
    max/mean expert load on a fixed evaluation batch every 10 steps."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(H, 16), nn.GELU(), nn.Linear(16, H))
    moe = MoEFeedForward(H, 8, num_experts=E, top_k=2, routing=routing, balance_loss="none",
                         bias_balancing=balancing, bias_update_rate=gamma)
    moe.router = nn.Linear(H, E, bias=True)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.3)
        moe.router.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    x_eval = torch.randn(1024, H)
    ratios = []
    for step in range(steps):
        x = torch.randn(32, H)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(moe(x), y) + collect_aux_loss(moe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_expert_biases(moe)
        if (step + 1) % 10 == 0:
            moe.eval()
            with torch.no_grad():
                moe(x_eval)
            moe.train()
            ratios.append(moe.expert_load()["max_over_mean"])
    return ratios, moe


@pytest.mark.parametrize("routing", ["softmax", "sigmoid", "noisy"])
def test_aux_loss_free_balancing_fixes_a_skewed_router_within_200_steps(routing):
    ratios, moe = _skewed_toy_run(routing, balancing=True)
    assert ratios[0] > 1.5  # the skew is real at the start
    assert max(ratios[-5:]) < 1.2  # balanced by step 160 and stays so (gamma 3e-3; docs/moe.md)
    assert moe.expert_bias[0] < moe.expert_bias[1:].min()  # the overloaded expert was pushed down
    assert float(moe.load_since_update.sum()) == 0  # consumed by the last update


def test_without_balancing_the_toy_router_stays_skewed():
    ratios, _ = _skewed_toy_run("softmax", balancing=False, steps=100)
    assert min(ratios) > 1.5


def test_bias_update_rule_and_counter():
    moe = make(bias_balancing=True, bias_update_rate=0.25)
    assert moe.expert_bias.shape == (E,) and "expert_bias" in moe.state_dict()
    assert "load_since_update" not in moe.state_dict()  # transient
    assert not moe.update_expert_bias()  # nothing counted yet
    moe.load_since_update.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    assert moe.update_expert_bias()
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.25, 0.25, 0.25, 0.25]))
    moe.eval()
    moe(torch.randn(5, H))
    assert float(moe.load_since_update.sum()) == 0  # eval forwards are not counted
    moe.train()
    moe(torch.randn(5, H))
    assert float(moe.load_since_update.sum()) == 10  # 5 tokens x top-2


def test_compact_keeps_routing_options_expert_bias_and_noise():
    moe = make(routing="noisy", balance_loss="cv2", z_loss_coef=1e-3, bias_balancing=True, bias_update_rate=0.01)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
        moe.router_noise.weight.normal_()
    model = nn.Sequential(moe).eval()
    x = torch.randn(16, H)
    ref = model(x)
    padnet.compact_(model)
    c = model[0]
    assert isinstance(c, CompactMoEFeedForward)
    assert c.routing_options() == moe.routing_options()
    torch.testing.assert_close(c.expert_bias, moe.expert_bias)
    torch.testing.assert_close(c.router_noise.weight, moe.router_noise.weight)
    torch.testing.assert_close(model(x), ref)
    torch.testing.assert_close(c.aux_loss, moe.aux_loss)


# ------------------------------------------------------------------------------ statistics


def test_expert_load_statistics():
    model = nn.Sequential(make(), nn.ReLU(), make(seed=1, bias_balancing=True))
    model(torch.randn(25, H))
    stats = expert_load_stats(model)
    assert set(stats) == {"0", "2"}
    for name, s in stats.items():
        counts = torch.tensor(s["counts"], dtype=torch.double)
        assert int(counts.sum()) == 25 * 2
        assert s["max_over_mean"] == pytest.approx(float(counts.max() / counts.mean()))
        assert s["cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
        assert sum(s["fraction"]) == pytest.approx(1.0)
    flat = summarize_expert_load(model)
    assert flat["moe/load_max_over_mean"] == pytest.approx(max(s["max_over_mean"] for s in stats.values()))
    assert "moe/expert_bias_abs_avg" in flat and "moe/balance_loss_avg" in flat
    assert summarize_expert_load(nn.Linear(2, 2)) == {}


# ------------------------------------------------------------------------------ bad input


def test_bad_routing_options_are_named():
    with pytest.raises(ValueError, match=r"top_k must satisfy 1 <= top_k <= num_experts=4, got 5"):
        MoEFeedForward(H, I, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"bias_update_rate \(gamma\) must be >= 0, got -0.001"):
        MoEFeedForward(H, I, bias_balancing=True, bias_update_rate=-1e-3)
    with pytest.raises(ValueError, match="gamma"):
        MoEFeedForward(H, I, bias_update_rate=float("nan"))
    with pytest.raises(ValueError, match="unknown routing 'hash'"):
        MoEFeedForward(H, I, routing="hash")
    with pytest.raises(ValueError, match="unknown balance_loss 'gshard'"):
        MoEFeedForward(H, I, balance_loss="gshard")
    with pytest.raises(ValueError, match="z_loss_coef must be >= 0"):
        MoEFeedForward(H, I, z_loss_coef=-1.0)


def test_router_nan_scores_raise_naming_the_layer():
    up, down = nn.Linear(H, I), nn.Linear(I, H)
    moe = MoEFeedForward.from_dense(up, down, num_experts=E, name="encoder.layer.3.mlp")
    with torch.no_grad():
        moe.router.weight[1, 0] = float("nan")
    x = torch.randn(6, H)
    with pytest.raises(FloatingPointError, match=r"MoEFeedForward 'encoder\.layer\.3\.mlp'.*non-finite scores.*6 of 6"):
        moe(x)
    x_bad = torch.randn(6, H)
    x_bad[2, 0] = float("inf")
    with torch.no_grad():
        moe.router.weight[1, 0] = 0.0
    with pytest.raises(FloatingPointError, match="1 of 6 tokens"):
        moe(x_bad)


def test_noisy_routing_keeps_float64():
    moe = make(routing="noisy", balance_loss="cv2").double()
    x = torch.randn(12, H, dtype=torch.double)
    y = moe(x)
    assert y.dtype == torch.double and moe.aux_loss.dtype == torch.double
    idx, gates, parts = moe.select_experts(x)
    assert gates.dtype == torch.double and parts["noisy"].dtype == torch.double
