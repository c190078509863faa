"""Gated (SwiGLU / GeGLU) experts in MoEFeedForward: math, masks, counting, compact, save/load, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.layers import CompactMoEFeedForward, MoEFeedForward
from padnet.layers.moe import moe_dispatch

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, E = 6, 10, 4


def gated_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """Per-token float64 reference straight from the raw parameters (routing from the layer's router)."""
    d = torch.float64
    x_flat = x.reshape(-1, moe.hidden_size)
    logits = moe.router(x_flat)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_p, top_i = torch.topk(probs, moe.top_k, dim=-1)
    lam_s, lam_d = (s.detach().to(d) for s in moe.scales())

    def eff(group, e):
        dyn = getattr(moe, f"experts_{group}")
        if dyn is None:
            return torch.zeros((), dtype=d)
        m = getattr(moe, f"mode_mask_{group}").to(d)
        return lam_d * m * dyn[e].detach().to(d) + lam_s * (1 - m) * getattr(moe, f"static_{group}").detach().to(d)

    out = torch.zeros(x_flat.shape[0], moe.hidden_size, dtype=d)
    for t in range(x_flat.shape[0]):
        xt = x_flat[t].detach().to(d)
        gates = top_p[t].to(d) / top_p[t].to(d).sum()
        for j in range(moe.top_k):
            e = int(top_i[t, j])
            up = eff("in", e) @ xt + eff("bias_in", e)
            gate = eff("gate", e) @ xt + eff("bias_gate", e)
            hidden = F.silu(gate) * up
            out[t] += gates[j] * (eff("out", e) @ hidden + eff("bias_out", e))
    return out.reshape(*x.shape[:-1], moe.hidden_size)


def random_masks_(moe, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for grp in moe.mode_groups():
        moe.set_mode_mask(grp.name, (torch.rand(grp.shape, generator=g) < p).float())


def make_gated(bias=True, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoEFeedForward(H, I, num_experts=E, top_k=top_k, activation="silu", bias=bias, gated=True, **kw)
    with torch.no_grad():
        moe.scale.phi.fill_(0.3)  # lambda_s != lambda_d
    return moe


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_gated_forward_matches_reference(bias, top_k):
    moe = make_gated(bias=bias, top_k=top_k).double()
    random_masks_(moe)
    x = torch.randn(3, 5, H, dtype=torch.double)
    ref = gated_reference(moe, x)
    torch.testing.assert_close(moe(x), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moe.eval()(x), ref, rtol=1e-10, atol=1e-12)


def test_gated_mode_groups_and_shapes():
    moe = make_gated()
    assert [g.name for g in moe.mode_groups()] == ["in", "gate", "out", "bias_in", "bias_gate", "bias_out"]
    assert moe.experts_gate.shape == (E, I, H) and moe.mode_mask_gate.shape == (I, H)
    no_bias = make_gated(bias=False)
    assert [g.name for g in no_bias.mode_groups()] == ["in", "gate", "out"]
    plain = MoEFeedForward(H, I, num_experts=E)
    assert plain.experts_gate is None and "experts_gate" not in dict(plain.named_parameters())


def test_gated_dead_entries_get_zero_gradient_and_live_ones_do():
    moe = make_gated().double()
    random_masks_(moe, seed=3)
    x = torch.randn(16, H, dtype=torch.double)
    moe(x).pow(2).sum().backward()
    m = moe.mode_mask_gate.bool()
    assert torch.all(moe.experts_gate.grad[:, ~m] == 0)
    assert torch.all(moe.static_gate.grad[m] == 0)
    assert moe.experts_gate.grad[:, m].abs().sum() > 0 and moe.static_gate.grad[~m].abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_gated_reproduces_the_dense_swiglu(bias):
    torch.manual_seed(1)
    gate, up, down = nn.Linear(H, I, bias=bias), nn.Linear(H, I, bias=bias), nn.Linear(I, H, bias=bias)
    moe = MoEFeedForward.from_dense(up, down, num_experts=E, top_k=2, activation="silu", fc_gate=gate,
                                    noise_std=0.0)
    assert moe.gated and moe.has_bias == bias
    x = torch.randn(4, 7, H)
    dense = down(F.silu(gate(x)) * up(x))
    torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-6)
    # split init: the gate rows follow the up rows (same neuron ids)
    split = MoEFeedForward.from_dense(up, down, num_experts=2, top_k=1, activation="silu", fc_gate=gate,
                                      init="split", noise_std=0.0)
    for e in range(2):
        idx = split.split_indices[e]
        torch.testing.assert_close(split.experts_gate[e], gate.weight[idx])
        torch.testing.assert_close(split.experts_in[e], up.weight[idx])
        torch.testing.assert_close(split.experts_out[e], down.weight[:, idx])


def test_from_dense_gated_bad_shapes_name_the_ffn():
    up, down = nn.Linear(H, I), nn.Linear(I, H)
    with pytest.raises(ValueError, match=r"FFN 'blk\.mlp'.*fc_gate must be Linear\(6, 10\)"):
        MoEFeedForward.from_dense(up, down, fc_gate=nn.Linear(H, I + 1), name="blk.mlp")
    with pytest.raises(ValueError, match=r"FFN 'blk\.mlp'.*fc_out must be"):
        MoEFeedForward.from_dense(up, nn.Linear(I + 2, H), fc_gate=nn.Linear(H, I), name="blk.mlp")
    with pytest.raises(ValueError, match="gated=True but fc_gate is missing"):
        MoEFeedForward.from_dense(up, down, gated=True)


@pytest.mark.parametrize("impl", ["sorted", "dense"])
def test_gated_dispatch_paths_agree(impl):
    torch.manual_seed(0)
    n, k = 9, 2
    x = torch.randn(n, H, dtype=torch.double)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    gates = torch.rand(n, k, dtype=torch.double)
    w_in, w_gate = torch.randn(E, I, H, dtype=torch.double), torch.randn(E, I, H, dtype=torch.double)
    b_in, b_gate = torch.randn(E, I, dtype=torch.double), torch.randn(E, I, dtype=torch.double)
    w_out, b_out = torch.randn(E, H, I, dtype=torch.double), torch.randn(E, H, dtype=torch.double)
    got = moe_dispatch(x, idx, gates, w_in, b_in, w_out, b_out, F.gelu, impl=impl, w_gate=w_gate, b_gate=b_gate)
    ref = torch.zeros(n, H, dtype=torch.double)
    for t in range(n):
        for j in range(k):
            e = int(idx[t, j])
            hidden = F.gelu(w_gate[e] @ x[t] + b_gate[e]) * (w_in[e] @ x[t] + b_in[e])
            ref[t] += gates[t, j] * (w_out[e] @ hidden + b_out[e])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="w_gate has shape"):
        moe_dispatch(x, idx, gates, w_in, b_in, w_out, b_out, F.gelu, impl=impl, w_gate=w_gate[:, :3])


@pytest.mark.parametrize("bias", [True, False])
def test_gated_compact_same_outputs_and_counts(bias):
    moe = make_gated(bias=bias)
    random_masks_(moe, p=0.3, seed=5)
    model = nn.Sequential(nn.Linear(H, H), moe)
    x = torch.randn(2, 5, H)
    ref = model(x)
    before = padnet.count_parameters(model)
    expected_mode = sum(int((1 - g.mask).sum()) + E * int(g.mask.sum()) for g in moe.mode_groups())
    assert before.static + before.dynamic == expected_mode
    padnet.compact_(model)
    compact = model[1]
    assert isinstance(compact, CompactMoEFeedForward) and compact.gated and compact.gate_proj is not None
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    after = padnet.count_parameters(model)
    assert (after.static, after.dynamic) == (before.static, before.dynamic)
    assert before.router == E * H + 1 and after.router == E * H  # router; phi is folded into the values
    stored = sum(p.numel() for g in compact.packed_groups() for p in (g.static_values, g.dynamic_values))
    assert stored == expected_mode


def test_gated_save_load_round_trip_pad_and_compact(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(H, H), make_gated(routing="sigmoid", bias_balancing=True))

    model = build()
    random_masks_(model[1], seed=2)
    with torch.no_grad():
        model[1].expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.05]))
    x = torch.randn(3, 4, H)
    path = padnet.save(model, tmp_path / "gated.safetensors")
    fresh = build()
    loaded = padnet.load(path, model=fresh)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded[1].expert_bias, model[1].expert_bias, rtol=0, atol=0)
    torch.testing.assert_close(loaded[1].mode_mask_gate, model[1].mode_mask_gate, rtol=0, atol=0)
    # deploy form: state_dict round trip into a compact layer rebuilt from the masks
    padnet.compact_(model)
    masks = {g.group_name: g.mask for g in model[1].packed_groups()}
    rebuilt = nn.Sequential(nn.Linear(H, H), CompactMoEFeedForward(
        H, I, E, 2, masks=masks, activation="silu", **model[1].routing_options()))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("compact", [False, True])
def test_gated_torch_export_matches_eager(compact):
    from padnet.io import export_program

    model = nn.Sequential(nn.Linear(H, H), make_gated(routing="sigmoid")).eval()
    random_masks_(model[1], seed=4)
    if compact:
        padnet.compact_(model)
    program = export_program(model, (torch.randn(3, 5, H),))
    for batch in (1, 4):
        x = torch.randn(batch, 5, H)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_gated_onnx_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from padnet.io import export_onnx, run_onnx

    model = nn.Sequential(nn.Linear(H, H), make_gated()).eval()
    random_masks_(model[1], seed=6)
    padnet.compact_(model)
    path = export_onnx(model, (torch.randn(2, 5, H),), tmp_path / "g.onnx", exporter="torchscript", opset=17)
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, x)[0]), ref, rtol=1e-4, atol=1e-5)


def test_gated_partition_touches_the_gate_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(H, H), MoEFeedForward(H, I, num_experts=E, top_k=2, gated=True,
                                                          activation="silu"))
    x, y = torch.randn(32, H), torch.randn(32, H)
    report = padnet.partition_(model, [(x, y)], F.mse_loss, ratio=0.3, iterations=1, warn_symmetric=False)
    assert report is not None
    masks = {g.name: g.mask for g in model[1].mode_groups()}
    assert "gate" in masks
    total = sum(m.numel() for m in masks.values())
    live = sum(int(m.sum()) for m in masks.values())
    assert live == round(0.3 * total)
    assert 0 < int(masks["gate"].sum()) < masks["gate"].numel()


@pytest.mark.parametrize("gated", [False, True])
def test_inference_reuses_effective_weights_until_something_changes(gated):
    """No-grad forwards reuse the combined expert weights; in-place updates, mask changes and
    training invalidate / free them; outputs always equal the uncached computation."""
    from padnet.layers import MoEFeedForward

    torch.manual_seed(0)
    moe = MoEFeedForward(8, 12, num_experts=4, top_k=2, gated=gated, activation="silu", dtype=torch.float64).eval()
    x = torch.randn(10, 8, dtype=torch.float64)

    def uncached():
        return moe._moe_forward(x, moe.effective_weights, moe.effective_gate_weights)

    with torch.no_grad():
        torch.testing.assert_close(moe(x), uncached(), rtol=0, atol=0)
        cached = moe.__dict__["_inference_cache"]["effective"][1][0][0]
        moe(x)
        assert moe.__dict__["_inference_cache"]["effective"][1][0][0] is cached  # reused
        moe.experts_in.mul_(1.25)  # optimizer-like in-place update
        torch.testing.assert_close(moe(x), uncached(), rtol=0, atol=0)
        mask = torch.zeros_like(moe.mode_mask_in)
        mask[:, :3] = 1
        moe.set_mode_mask("in", mask)
        torch.testing.assert_close(moe(x), uncached(), rtol=0, atol=0)
    moe.train()
    moe(x).sum().backward()  # autograd: recombined, nothing cached
    assert "_inference_cache" not in moe.__dict__ and "_inference_cache" not in moe.state_dict()
    assert moe.experts_in.grad is not None
