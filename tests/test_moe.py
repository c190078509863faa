"""Tests for padnet.layers.MoEFeedForward and its deploy form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers import CompactMoEFeedForward, MoEFeedForward, collect_aux_loss
from padnet.layers.moe import moe_dispatch

H, I, E = 6, 10, 4


def reference_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Plain per-token reference, in float64, straight from the raw parameters.

    Routing uses the layer's own router logits (same op, same shape, so the same
    top-k choice); everything after that is recomputed here from the formula
    W_e_eff = lambda_d * M * W_e + lambda_s * (1 - M) * W_s.
    """
    d = torch.float64
    x_flat = x.reshape(-1, moe.hidden_size)
    logits = moe.router(x_flat)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_p, top_i = torch.topk(probs, moe.top_k, dim=-1)
    lam_s, lam_d = (s.detach().to(d) for s in moe.scales())

    def eff(dyn, sta, mask, e):
        if dyn is None:
            return None
        m = mask.to(d)
        return lam_d * m * dyn[e].detach().to(d) + lam_s * (1 - m) * sta.detach().to(d)

    out = torch.zeros(x_flat.shape[0], moe.hidden_size, dtype=d)
    for t in range(x_flat.shape[0]):
        xt = x_flat[t].detach().to(d)
        p = top_p[t].to(d)
        gates = p / p.sum() if moe.normalize_gates else p
        for j in range(moe.top_k):
            e = int(top_i[t, j])
            w_in = eff(moe.experts_in, moe.static_in, moe.mode_mask_in, e)
            w_out = eff(moe.experts_out, moe.static_out, moe.mode_mask_out, e)
            b_in = eff(moe.experts_bias_in, moe.static_bias_in, moe.mode_mask_bias_in, e)
            b_out = eff(moe.experts_bias_out, moe.static_bias_out, moe.mode_mask_bias_out, e)
            hdn = w_in @ xt + (b_in if b_in is not None else 0)
            hdn = moe.act(hdn)
            y = w_out @ hdn + (b_out if b_out is not None else 0)
            out[t] += gates[j] * y
    return out.reshape(*x.shape[:-1], moe.hidden_size)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def random_masks_(moe: MoEFeedForward, p: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for grp in moe.mode_groups():
        moe.set_mode_mask(grp.name, (torch.rand(grp.shape, generator=g) < p).float())


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return MoEFeedForward(H, I, **{"num_experts": E, **kw})


# ------------------------------------------------------------------------------------------
# equivalence with the per-token reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mask", ["random", "ones"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(top_k, mask, bias):
    moe = make(top_k=top_k, bias=bias)
    if mask == "random":
        random_masks_(moe)
        assert 0 < moe.dynamic_ratio() < 1
    x = torch.randn(3, 5, H)
    y = moe(x)
    assert y.shape == x.shape
    assert rel_err(y, reference_moe(moe, x)) < 1e-5


def test_all_ones_mask_is_plain_moe():
    moe = make()
    x = torch.randn(7, H)
    # a plain MoE written without masks/scales: every expert uses its own raw weights
    probs = torch.softmax(moe.router(x), -1)
    top_p, top_i = probs.topk(2, -1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = top_i[t, j]
            hdn = F.gelu(x[t] @ moe.experts_in[e].T + moe.experts_bias_in[e])
            ref[t] += gates[t, j] * (hdn @ moe.experts_out[e].T + moe.experts_bias_out[e])
    assert rel_err(moe(x), ref) < 1e-5


def test_all_zeros_mask_is_dense_static_ffn_independent_of_routing():
    moe = make()
    moe.set_all_modes(False)
    with torch.no_grad():
        moe.scale.phi.fill_(0.4)
    lam_s, _ = moe.scales()
    x = torch.randn(2, 4, H)
    dense = F.linear(F.gelu(F.linear(x, lam_s * moe.static_in, lam_s * moe.static_bias_in)),
                     lam_s * moe.static_out, lam_s * moe.static_bias_out)
    y1 = moe(x)
    assert rel_err(y1, dense) < 1e-5
    with torch.no_grad():
        moe.router.weight.normal_(0, 5.0)  # completely different routing
    y2 = moe(x)
    assert rel_err(y2, dense) < 1e-5


@pytest.mark.parametrize("top_k", [1, 2])
def test_learned_scales_nonzero_phi(top_k):
    moe = make(top_k=top_k)
    random_masks_(moe, seed=3)
    with torch.no_grad():
        moe.scale.phi.fill_(0.7)
    lam_s, lam_d = (s.detach() for s in moe.scales())
    assert float(lam_d) > 1.0 > float(lam_s) and abs(float(lam_s + lam_d) - 2.0) < 1e-6
    x = torch.randn(9, H)
    assert rel_err(moe(x), reference_moe(moe, x)) < 1e-5


def test_scale_none_and_unnormalized_gates():
    moe = make(scale="none", normalize_gates=False, top_k=1)
    random_masks_(moe, seed=5)
    assert moe.scale.phi is None
    x = torch.randn(8, H)
    assert rel_err(moe(x), reference_moe(moe, x)) < 1e-5


def test_single_token_and_3d_input():
    moe = make()
    random_masks_(moe)
    for shape in [(1, H), (1, 1, H), (H,), (2, 3, H)]:
        x = torch.randn(*shape)
        y = moe(x)
        assert y.shape == x.shape
        assert rel_err(y, reference_moe(moe, x)) < 1e-5


def test_float64_tight():
    moe = make(dtype=torch.float64)
    random_masks_(moe)
    with torch.no_grad():
        moe.scale.phi.fill_(-0.3)
    x = torch.randn(4, 3, H, dtype=torch.float64)
    y = moe(x)
    assert y.dtype == torch.float64
    assert rel_err(y, reference_moe(moe, x)) < 1e-12


def test_bfloat16_loose():
    moe = make(dtype=torch.bfloat16)
    random_masks_(moe)
    assert moe.mode_mask_in.dtype == torch.bfloat16
    x = torch.randn(4, 3, H, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference_moe(moe, x)) < 3e-2
    y.float().sum().backward()
    assert moe.experts_in.grad.dtype == torch.bfloat16


def test_custom_activation_module_and_callable():
    for act in (nn.Tanh(), torch.tanh, nn.Tanh):
        moe = make(activation=act)
        random_masks_(moe)
        x = torch.randn(5, H)
        assert rel_err(moe(x), reference_moe(moe, x)) < 1e-5
    assert isinstance(make(activation="gelu_tanh").act, nn.GELU)


def test_dispatch_function_directly():
    torch.manual_seed(1)
    n, k = 9, 2
    x = torch.randn(n, H)
    w_in, b_in = torch.randn(E, I, H), torch.randn(E, I)
    w_out, b_out = torch.randn(E, H, I), torch.randn(E, H)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    idx[:, 0] = 0  # expert 3 may get nothing, expert 0 many
    gates = torch.rand(n, k)
    out = moe_dispatch(x, idx, gates, w_in, b_in, w_out, b_out, torch.relu)
    ref = torch.zeros(n, H)
    for t in range(n):
        for j in range(k):
            e = idx[t, j]
            ref[t] += gates[t, j] * (w_out[e] @ torch.relu(w_in[e] @ x[t] + b_in[e]) + b_out[e])
    assert rel_err(out, ref) < 1e-5
    assert moe_dispatch(x[:0], idx[:0], gates[:0], w_in, b_in, w_out, b_out, torch.relu).shape == (0, H)


# ------------------------------------------------------------------------------------------
# aux loss
# ------------------------------------------------------------------------------------------


def test_aux_loss_hand_computation():
    moe = make(aux_loss_coef=0.05)
    x = torch.randn(2, 6, H)
    moe(x)
    probs = torch.softmax(moe.router(x.reshape(-1, H)), -1)
    idx = probs.topk(2, -1).indices
    counts = torch.stack([(idx == e).sum() for e in range(E)])
    f = counts.float() / (12 * 2)
    expected = 0.05 * E * (f * probs.mean(0)).sum()
    assert torch.allclose(moe.aux_loss, expected, rtol=1e-6, atol=0)
    assert moe.aux_loss.dim() == 0
    assert torch.equal(moe.last_expert_counts, counts)
    assert moe.last_expert_counts.dtype == torch.long and not moe.last_expert_counts.requires_grad
    # uniform router: P_e = 1/E and sum_e f_e = 1 -> loss = coef exactly
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert abs(moe.aux_loss.item() - 0.05) < 1e-7


def test_aux_loss_gives_router_gradient_and_collect():
    moe = make(top_k=1)  # top_k=1 + normalised gates: the router learns only through aux_loss
    model = nn.Sequential(moe, nn.Linear(H, H), make(seed=1))
    x = torch.randn(10, H)
    model(x)
    total = collect_aux_loss(model)
    assert torch.allclose(total, moe.aux_loss + model[2].aux_loss)
    total.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert float(collect_aux_loss(nn.Linear(2, 2))) == 0.0


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


def test_dead_entries_zero_grad_live_entries_nonzero():
    moe = make()
    random_masks_(moe, p=0.5, seed=7)
    with torch.no_grad():
        moe.scale.phi.fill_(0.2)
    x = torch.randn(64, H)
    y = moe(x)
    assert (moe.last_expert_counts > 0).all()
    (y.pow(2).sum() + moe.aux_loss).backward()
    for g in moe.mode_groups():
        m = g.mask.bool()
        dyn_grad, sta_grad = g.dynamic.grad, g.static.grad
        assert (dyn_grad[:, ~m] == 0).all(), g.name  # experts where M = 0 are dead
        assert (sta_grad[m] == 0).all(), g.name  # static where M = 1 is dead
        assert (dyn_grad[:, m] != 0).all(), g.name
        assert (sta_grad[~m] != 0).all(), g.name
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.scale.phi.grad is not None and moe.scale.phi.grad != 0


def test_router_gets_gradient_from_output():
    moe = make(top_k=2, aux_loss_coef=0.0)
    x = torch.randn(16, H)
    moe(x).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# state, copies
# ------------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    moe = make()
    random_masks_(moe, seed=2)
    with torch.no_grad():
        moe.scale.phi.fill_(0.5)
    sd = moe.state_dict()
    assert {"mode_mask_in", "mode_mask_out", "mode_mask_bias_in", "mode_mask_bias_out", "scale.phi",
            "router.weight", "experts_in", "static_out"} <= set(sd)
    fresh = make(seed=123)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 4, H)
    assert torch.equal(fresh(x), moe(x))
    assert torch.equal(fresh.mode_mask_in, moe.mode_mask_in)


def test_deepcopy_after_forward():
    moe = make()
    y = moe(torch.randn(4, H))
    clone = copy.deepcopy(moe)  # aux_loss holds a graph; must still copy
    x = torch.randn(5, H)
    assert torch.equal(clone(x), moe(x))
    y.sum().backward()


def test_bias_false_attributes_are_none():
    moe = make(bias=False)
    for name in ("experts_bias_in", "experts_bias_out", "static_bias_in", "static_bias_out",
                 "mode_mask_bias_in", "mode_mask_bias_out"):
        assert getattr(moe, name) is None
    assert [g.name for g in moe.mode_groups()] == ["in", "out"]


def test_shapes_and_init():
    moe = make()
    assert moe.experts_in.shape == (E, I, H) and moe.experts_out.shape == (E, H, I)
    assert moe.static_in.shape == (I, H) and moe.static_out.shape == (H, I)
    assert moe.experts_bias_in.shape == (E, I) and moe.experts_bias_out.shape == (E, H)
    assert moe.mode_mask_in.shape == (I, H) and bool((moe.mode_mask_in == 1).all())
    assert moe.mode_mask_in.dtype == torch.float32
    assert isinstance(moe.router, nn.Linear) and moe.router.bias is None
    assert moe.router.weight.shape == (E, H)
    assert [g.name for g in moe.mode_groups()] == ["in", "out", "bias_in", "bias_out"]
    assert moe.num_factors == E
    # nn.Linear default init bounds, experts independent
    assert moe.experts_in.abs().max() <= 1 / H**0.5 + 1e-6
    assert moe.experts_out.abs().max() <= 1 / I**0.5 + 1e-6
    assert not torch.equal(moe.experts_in[0], moe.experts_in[1])
    lam_s, lam_d = (s.detach() for s in moe.scales())
    assert float(lam_s) == 1.0 and float(lam_d) == 1.0


# ------------------------------------------------------------------------------------------
# from_dense
# ------------------------------------------------------------------------------------------


def _dense(bias=True, dtype=torch.float32, i=I):
    torch.manual_seed(11)
    return nn.Linear(H, i, bias=bias, dtype=dtype), nn.Linear(i, H, bias=bias, dtype=dtype)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycle_exact_without_noise(top_k):
    fc1, fc2 = _dense()
    moe = MoEFeedForward.from_dense(fc1, fc2, num_experts=E, top_k=top_k, noise_std=0.0)
    for e in range(E):
        assert torch.equal(moe.experts_in[e], fc1.weight) and torch.equal(moe.experts_bias_out[e], fc2.bias)
    assert torch.equal(moe.static_in, fc1.weight) and torch.equal(moe.static_out, fc2.weight)
    x = torch.randn(3, 7, H)
    dense = fc2(F.gelu(fc1(x)))
    assert torch.allclose(moe(x), dense, rtol=1e-6, atol=1e-6)
    # float64: exact up to the rounding of the gate sum
    fc1d, fc2d = fc1.double(), fc2.double()
    moe64 = MoEFeedForward.from_dense(fc1d, fc2d, num_experts=E, top_k=top_k, noise_std=0.0)
    assert moe64.experts_in.dtype == torch.float64
    assert rel_err(moe64(x.double()), fc2d(F.gelu(fc1d(x.double())))) < 1e-14


def test_upcycle_noise_breaks_symmetry():
    fc1, fc2 = _dense()
    moe = MoEFeedForward.from_dense(fc1, fc2, num_experts=E, noise_std=0.01,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(moe.static_in, fc1.weight)
    diffs = [(moe.experts_in[e] - fc1.weight).abs().max().item() for e in range(E)]
    assert all(0 < d < 0.1 * fc1.weight.std().item() for d in diffs)
    assert not torch.equal(moe.experts_in[0], moe.experts_in[1])
    assert not torch.equal(moe.experts_bias_in[0], moe.experts_bias_in[1])
    x = torch.randn(5, H)
    assert rel_err(moe(x), fc2(F.gelu(fc1(x)))) < 0.1
    assert moe.router.weight.abs().max() < 0.2  # small random router
    assert moe.router.weight.abs().max() > 0


def test_upcycle_without_bias_and_kwargs():
    fc1, fc2 = _dense(bias=False)
    moe = MoEFeedForward.from_dense(fc1, fc2, num_experts=2, top_k=1, activation="relu", scale="none",
                                    aux_loss_coef=0.1, noise_std=0.0)
    assert moe.experts_bias_in is None and moe.scale.phi is None and moe.aux_loss_coef == 0.1
    x = torch.randn(4, H)
    assert torch.allclose(moe(x), fc2(torch.relu(fc1(x))), atol=1e-6)


def test_split_shapes_and_shared_neurons():
    i_dense, size = 16, 6
    fc1, fc2 = _dense(i=i_dense)
    importance = torch.arange(i_dense, dtype=torch.float32).flip(0)  # neuron 0 most important
    moe = MoEFeedForward.from_dense(fc1, fc2, num_experts=E, init="split", importance=importance,
                                    expert_size=size, noise_std=0.0)
    assert moe.intermediate_size == size
    assert moe.experts_in.shape == (E, size, H) and moe.experts_out.shape == (E, H, size)
    assert moe.static_in.shape == (size, H) and moe.mode_mask_in.shape == (size, H)
    idx = moe.split_indices
    assert idx.shape == (E, size)
    # minimal sharing covering 16 neurons with 4 x 6 slots: ceil((24 - 16) / 3) = 3
    ns = moe.num_shared
    assert ns == 3
    shared = set(range(ns))  # the most important neurons
    for e in range(E):
        row = idx[e].tolist()
        assert set(row[:ns]) == shared and len(set(row)) == size
        assert torch.equal(moe.experts_in[e], fc1.weight[idx[e]])
        assert torch.equal(moe.experts_out[e], fc2.weight[:, idx[e]])
        assert torch.equal(moe.experts_bias_in[e], fc1.bias[idx[e]])
        assert torch.equal(moe.experts_bias_out[e], fc2.bias)
    own = [set(idx[e, ns:].tolist()) for e in range(E)]
    assert all(not (own[a] & own[b]) for a in range(E) for b in range(a + 1, E))
    covered = set().union(*own) | shared
    assert len(covered) == i_dense - 1  # only the least important neuron is dropped
    assert i_dense - 1 not in covered
    assert torch.equal(moe.static_in, fc1.weight[:size])  # the `size` most important, in order


def test_split_default_importance_and_size():
    fc1, fc2 = _dense(i=12)
    moe = MoEFeedForward.from_dense(fc1, fc2, num_experts=3, init="split")
    assert moe.intermediate_size == 4  # ceil(12 / 3)
    assert moe.num_shared == 0  # 3 x 4 slots exactly cover 12 neurons
    assert sorted(moe.split_indices.reshape(-1).tolist()) == list(range(12))
    proxy = fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)
    assert int(moe.split_indices[0, 0]) == int(proxy.argmax())
    moe(torch.randn(3, H)).sum().backward()


def test_from_dense_bad_inputs():
    fc1, fc2 = _dense()
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, nn.Linear(I + 1, H))
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, nn.Linear(I, H + 1))
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, fc2, init="bogus")
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, fc2, init="split", importance=torch.ones(I + 1))
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, fc2, init="split", expert_size=I + 1)
    with pytest.raises(ValueError):
        MoEFeedForward.from_dense(fc1, fc2, importance=torch.ones(I))  # importance needs split


# ------------------------------------------------------------------------------------------
# deploy form
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["random", "ones", "zeros"])
@pytest.mark.parametrize("bias", [True, False])
def test_compact_matches_and_stores_live_floats(mask, bias):
    moe = make(bias=bias)
    if mask == "random":
        random_masks_(moe, seed=4)
    elif mask == "zeros":
        moe.set_all_modes(False)
    with torch.no_grad():
        moe.scale.phi.fill_(0.3)
    compact = CompactMoEFeedForward.from_layer(moe)
    names = ["in_proj", "out_proj"] + (["bias_in", "bias_out"] if bias else [])
    assert [n for n, _ in compact.named_children() if n in names] == names
    assert len(compact.packed_groups()) == len(names)
    if not bias:
        assert compact.bias_in is None and compact.bias_out is None
    x = torch.randn(2, 5, H)
    y_pad, y_c = moe(x), compact(x)
    assert rel_err(y_c, y_pad) < 1e-5
    assert torch.equal(compact.last_expert_counts, moe.last_expert_counts)
    assert torch.allclose(compact.aux_loss, moe.aux_loss)
    stored = sum(p.static_values.numel() + p.dynamic_values.numel() for p in compact.packed_groups())
    expected = sum(int((1 - g.mask).sum()) + E * int(g.mask.sum()) for g in moe.mode_groups())
    assert stored == expected
    # no dense expert/static tensors left: only packed values and the router
    n_params = sum(p.numel() for p in compact.parameters())
    assert n_params == expected + compact.router.weight.numel()


def test_compact_state_dict_rebuild():
    moe = make()
    random_masks_(moe, seed=9)
    compact = CompactMoEFeedForward.from_layer(moe)
    masks = {g.name: g.mask for g in moe.mode_groups()}
    fresh = CompactMoEFeedForward(H, I, E, 2, masks=masks)
    fresh.load_state_dict(compact.state_dict())
    x = torch.randn(6, H)
    assert torch.equal(fresh(x), compact(x))


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def test_bad_inputs():
    moe = make()
    with pytest.raises(ValueError, match=rf"{H}.*{H + 1}|{H + 1}.*{H}"):
        moe(torch.randn(3, H + 1))
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MoEFeedForward(H, I, num_experts=0)
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(H, I, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(H, I, num_experts=2, top_k=0)
    with pytest.raises(ValueError, match="gelu.*relu.*silu"):
        MoEFeedForward(H, I, activation="bogus")
    with pytest.raises(ValueError):
        MoEFeedForward(0, I)
    with pytest.raises(ValueError):
        MoEFeedForward(H, 0)
    with pytest.raises(ValueError):
        MoEFeedForward(H, I, scale="bogus")


def test_whole_module_save_load_after_inference_drops_the_derived_caches():
    """``torch.save(model)`` after an inference forward (which fills the per-process derived-weight cache with
    raw storages) loads again, and the copy computes the same outputs."""
    import io

    moe = make(bias=True)
    random_masks_(moe, 0.4)
    moe.eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        expected = moe(x)
    assert moe.__dict__.get("_inference_cache")  # the cache this test is about is filled
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "_inference_cache" not in loaded.__dict__
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert "_inference_cache" not in copy.deepcopy(moe).__dict__
