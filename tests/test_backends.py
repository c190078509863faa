"""Dynamic-conv backends, structured fast paths, deploy-form plans and MoE dispatch paths.

Every backend against a per-sample reference in float64 (outputs and
gradients); no timing assertions.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from padnet.layers import CompactDynamicConv2d, DynamicConv2d, MoEFeedForward
from padnet import ops as cf
from padnet.ops import backend_selection, bmm_kernels, channel_split
from padnet.layers import dynamic_conv as dynamic_conv_module
from padnet.layers.dynamic_conv import MaskStructure
from padnet.layers.moe import moe_dispatch, route_tokens

BACKENDS = ["weight", "bmm", "output"]

pytestmark = pytest.mark.usefixtures("one_thread")


def per_sample_reference(x, pi, dyn, sta, stride, padding, dilation, groups):
    outs = []
    for b in range(x.shape[0]):
        w = torch.einsum("k,k...->...", pi[b], dyn)
        if sta is not None:
            w = w + sta
        outs.append(F.conv2d(x[b : b + 1], w, None, stride, padding, dilation, groups))
    return torch.cat(outs)


GEOMETRIES = [
    dict(cin=6, cout=10, groups=1, kernel=3, stride=1, padding=1, dilation=1),
    dict(cin=6, cout=10, groups=2, kernel=3, stride=2, padding=1, dilation=1),
    dict(cin=6, cout=6, groups=6, kernel=3, stride=1, padding=1, dilation=1),  # depthwise
    dict(cin=6, cout=10, groups=1, kernel=3, stride=2, padding=2, dilation=2),
    dict(cin=6, cout=10, groups=1, kernel=1, stride=1, padding=0, dilation=1),
    dict(cin=6, cout=10, groups=1, kernel=1, stride=2, padding=0, dilation=1),
    dict(cin=6, cout=10, groups=1, kernel=(3, 2), stride=1, padding="same", dilation=(1, 2)),
]


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "weights", 256)
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "cols", 512)


CASES = [(g, s, False) for g in GEOMETRIES for s in (True, False)] + [(g, True, True) for g in GEOMETRIES[:4]]


@pytest.mark.parametrize("geom, with_static, tiled", CASES,
                         ids=lambda v: f"g{v['groups']}k{v['kernel']}s{v['stride']}p{v['padding']}"
                         if isinstance(v, dict) else str(v))
def test_backends_match_per_sample_reference_with_gradients(geom, with_static, tiled, request):
    if tiled:
        request.getfixturevalue("tiny_tiles")
    torch.manual_seed(0)
    kernel = geom["kernel"] if isinstance(geom["kernel"], tuple) else (geom["kernel"],) * 2
    cg = geom["cin"] // geom["groups"]
    args = (geom["stride"], geom["padding"], geom["dilation"], geom["groups"])
    for batch in (1, 4):
        x = torch.randn(batch, geom["cin"], 7, 8, dtype=torch.double, requires_grad=True)
        pi = torch.softmax(torch.randn(batch, 3, dtype=torch.double), -1).requires_grad_()
        dyn = torch.randn(3, geom["cout"], cg, *kernel, dtype=torch.double, requires_grad=True)
        sta = torch.randn(geom["cout"], cg, *kernel, dtype=torch.double, requires_grad=True) if with_static else None
        leaves = [t for t in (x, pi, dyn, sta) if t is not None]
        ref = per_sample_reference(x, pi, dyn, sta, *args)
        gy = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, leaves, gy)
        for backend in BACKENDS:
            y = cf.dynamic_conv2d(x, pi, dyn, sta, None, None, *args, backend=backend)
            torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=f"{backend} forward")
            grads = torch.autograd.grad(y, leaves, gy)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=f"{backend} gradient")
            with torch.no_grad():
                y_nograd = cf.dynamic_conv2d(x, pi, dyn, sta, None, None, *args, backend=backend)
            torch.testing.assert_close(y_nograd, ref, rtol=1e-10, atol=1e-10)


def test_bias_and_auto_backend():
    torch.manual_seed(1)
    x = torch.randn(5, 4, 6, 6, dtype=torch.double)
    pi = torch.softmax(torch.randn(5, 3, dtype=torch.double), -1)
    dyn = torch.randn(3, 8, 4, 3, 3, dtype=torch.double)
    sta = torch.randn(8, 4, 3, 3, dtype=torch.double)
    bd, bs = torch.randn(3, 8, dtype=torch.double), torch.randn(8, dtype=torch.double)
    ref = per_sample_reference(x, pi, dyn, sta, 1, 1, 1, 1) + (pi @ bd + bs)[:, :, None, None]
    for backend in ["auto", *BACKENDS]:
        y = cf.dynamic_conv2d(x, pi, dyn, sta, bd, bs, 1, 1, 1, 1, backend=backend)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y = cf.dynamic_conv2d(x, pi, dyn, sta, None, bs, 1, 1, 1, 1)
    torch.testing.assert_close(y, per_sample_reference(x, pi, dyn, sta, 1, 1, 1, 1) + bs[:, None, None])
    with pytest.raises(ValueError, match="backend"):
        cf.dynamic_conv2d(x, pi, dyn, sta, backend="magic")


def test_im2col_col2im_are_adjoint():
    torch.manual_seed(2)
    for kernel, stride, padding, dilation in [((3, 3), 1, 1, 1), ((3, 2), 2, 1, (1, 2)), ((1, 1), 2, 0, 1)]:
        geom = cf.ConvGeometry(kernel, stride, padding, dilation, 1)
        x = torch.randn(2, 3, 7, 6, dtype=torch.double)
        cols, _ = cf.im2col(x, geom)
        torch.testing.assert_close(cols, F.unfold(x, kernel, dilation, padding, stride))
        g = torch.randn_like(cols)
        # <im2col(x), g> == <x, col2im(g)>
        lhs = (cols * g).sum()
        rhs = (x * cf.col2im(g, x.shape, geom)).sum()
        torch.testing.assert_close(lhs, rhs)


def test_select_backend_rule():
    sel = cf.select_backend
    assert sel("bmm", 32, 64, 1, out_pixels=16) == "bmm"  # explicit passes through
    assert sel("auto", 1, 64, 1, out_pixels=16) == "weight"  # batch 1: plain conv on the aggregated kernel
    assert sel("auto", 32, 64, 64, out_pixels=256) == "weight"  # depthwise
    assert sel("auto", 32, 64, 1, out_pixels=backend_selection._GROUPED_MIN_L) == "weight"  # small kernels, wide GEMMs
    assert sel("auto", 32, 512, 1, out_pixels=backend_selection._OUTPUT_MAX_L + 1) == "bmm"
    thin = dict(out_pixels=backend_selection._OUTPUT_MAX_L)
    for batch in (8, 32):  # thin per-sample GEMMs: the fused kernel where it can run, else the tiled GEMM
        assert sel("auto", batch, 512, 1, fused_available=True, **thin) == "fused"
        assert sel("auto", batch, 512, 1, **thin) == "bmm"
        assert sel("auto", batch, 512, 1, requires_grad=True, fused_available=True, **thin) == "bmm"
    assert sel("auto", 32, 512, 4, fused_available=True, **thin) == "output"  # grouped: the K-fold conv
    assert sel("auto", 32, 512, 1, out_pixels=backend_selection._GROUPED_MIN_L, device="cuda") == "weight"
    for batch in (1, 32):
        for groups, out in ((1, 64), (64, 64)):
            assert sel("auto", batch, out, groups, out_pixels=256, exporting=True) != "weight"


def test_export_mode_never_uses_grouped_weight_backend():
    x = torch.randn(3, 4, 5, 5)
    pi = torch.softmax(torch.randn(3, 2), -1)
    dyn = torch.randn(2, 4, 4, 3, 3)
    assert cf.resolve_backend(x, pi, dyn, None, 1, 1, 1, 1, "weight") == "weight"
    with cf.export_mode():
        assert cf.is_exporting()
        assert cf.resolve_backend(x, pi, dyn, None, 1, 1, 1, 1, "weight") in ("bmm", "output")
        assert cf.resolve_backend(x, pi, dyn[:, :, :1], None, 1, 1, 1, 4, "auto") == "output"
    assert not cf.is_exporting()


def test_autotune_cache_is_keyed_and_optional(monkeypatch):
    cf.clear_autotune_cache()
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    assert not cf.autotune_enabled()
    monkeypatch.delenv("PADNET_AUTOTUNE", raising=False)
    assert cf.autotune_enabled()  # on by default (issue 15); tests/conftest.py turns it off for the suite
    monkeypatch.setenv("PADNET_AUTOTUNE", "1")
    assert cf.autotune_enabled()
    cf.set_autotune(False)
    try:
        assert not cf.autotune_enabled()
        cf.set_autotune(True)
        x = torch.randn(4, 4, 6, 6, dtype=torch.double)
        pi = torch.softmax(torch.randn(4, 2, dtype=torch.double), -1)
        dyn = torch.randn(2, 6, 4, 3, 3, dtype=torch.double)
        ref = per_sample_reference(x, pi, dyn, None, 1, 1, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(cf.dynamic_conv2d(x, pi, dyn, None, padding=1), ref)
        torch.testing.assert_close(cf.dynamic_conv2d(x, pi, dyn, None, padding=1), ref)
        cache = cf.autotune_cache()
        assert len(cache) == 2  # grad-enabled and no-grad are separate keys
        assert {key[-1] for key in cache} == {True, False}
        assert set(cache.values()) <= set(cf.CONCRETE_BACKENDS)
        cf.dynamic_conv2d(x, pi, dyn, None, padding=1)
        assert len(cf.autotune_cache()) == 2  # cached: no new trial
    finally:
        cf.set_autotune(None)
        cf.clear_autotune_cache()


# --------------------------------------------------------------------------------------------
# DynamicConv2d structured fast paths
# --------------------------------------------------------------------------------------------


def layer_reference(layer, x):
    """docs/design.md formula from the raw parameters, per sample."""
    pi = layer.routing_weights(x)
    lam_s, lam_d = layer.scales()
    m = layer.mode_mask
    outs = []
    for b in range(x.shape[0]):
        mixed = torch.einsum("k,k...->...", pi[b], layer.weight_dynamic)
        w = lam_d * m * mixed + lam_s * (1 - m) * layer.weight_static
        bias = None
        if layer.bias_dynamic is not None:
            mb = layer.bias_mode_mask
            bias = lam_d * mb * (pi[b] @ layer.bias_dynamic) + lam_s * (1 - mb) * layer.bias_static
        outs.append(F.conv2d(x[b : b + 1], w, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def make_masked_layer(kind, groups=1, bias=True, routing="softmax", seed=0):
    torch.manual_seed(seed)
    cin = cout = 8 if groups > 1 else None
    layer = DynamicConv2d(cin or 6, cout or 10, 3, padding=1, groups=groups, bias=bias, routing=routing).double()
    g = torch.Generator().manual_seed(seed)
    shape = layer.mode_mask.shape
    if kind == "ones":
        mask = torch.ones(shape)
    elif kind == "zeros":
        mask = torch.zeros(shape)
    elif kind == "channel":
        rows = torch.zeros(shape[0])
        rows[torch.randperm(shape[0], generator=g)[: max(1, shape[0] // 3)]] = 1
        mask = rows.view(-1, 1, 1, 1).expand(shape).clone()
    else:
        mask = (torch.rand(shape, generator=g) < 0.3).double()
    layer.set_mode_mask("weight", mask)
    if bias:
        layer.set_mode_mask("bias", (torch.rand(shape[0], generator=g) < 0.5).double())
    with torch.no_grad():
        layer.scale.phi.fill_(0.3)
    return layer


KINDS = ["ones", "zeros", "channel", "element"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
@pytest.mark.parametrize("size", [7, 16])  # 16x16 = 256 output pixels: channel masks take the dense path
def test_structured_paths_match_reference_and_general_gradients(kind, groups, routing, size):
    layer = make_masked_layer(kind, groups=groups, routing=routing)
    assert layer.mask_structure().kind == kind
    x = torch.randn(4, layer.in_channels, size, size, dtype=torch.double) + torch.randn(
        4, layer.in_channels, 1, 1, dtype=torch.double)
    torch.testing.assert_close(layer(x), layer_reference(layer, x), rtol=1e-10, atol=1e-10)
    # gradients of the fast path == gradients of the literal general path (explicit backend)
    general = copy.deepcopy(layer)
    general.backend = "weight"
    gy = torch.randn(4, layer.out_channels, size, size, dtype=torch.double)
    layer(x).backward(gy)
    general(x).backward(gy)
    for (name, p), (_, q) in zip(layer.named_parameters(), general.named_parameters()):
        assert p.grad is not None, f"{name} has no gradient (dead entries must get zeros, not None)"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    m = layer.mode_mask.bool()
    assert torch.all(layer.weight_dynamic.grad[:, ~m] == 0) and torch.all(layer.weight_static.grad[m] == 0)


def test_training_form_inference_cache():
    layer = make_masked_layer("element").eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    ref = layer_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
        cached = layer.__dict__["_inference_cache"]["plan"][1][1][0]
        layer(x)
        assert layer.__dict__["_inference_cache"]["plan"][1][1][0] is cached  # reused
        layer.weight_dynamic.mul_(1.5)  # optimizer-like in-place update invalidates
        torch.testing.assert_close(layer(x), layer_reference(layer, x))
        layer.set_mode_mask("weight", torch.ones_like(layer.mode_mask))
        torch.testing.assert_close(layer(x), layer_reference(layer, x))
    layer(x).sum().backward()  # autograd: no cache kept
    assert "_inference_cache" not in layer.__dict__ and "_inference_cache" not in layer.state_dict()


def test_mask_requiring_grad_keeps_the_mask_in_the_graph():
    """Mode partition scores dL/dM: fast paths must fall back to combine_factors then."""
    for kind in ("ones", "channel"):
        layer = make_masked_layer(kind)
        layer.mode_mask.requires_grad_(True)
        x = torch.randn(2, 6, 5, 5, dtype=torch.double)
        layer(x).sum().backward()
        assert layer.mode_mask.grad is not None


def test_mask_structure_cache_follows_mask_changes():
    layer = make_masked_layer("ones")
    assert layer.mask_structure().kind == "ones"
    layer.set_all_modes(dynamic=False)
    assert layer.mask_structure().kind == "zeros"
    st = MaskStructure.from_mask(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert st.kind == "element"
    st = MaskStructure.from_mask(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    assert st.kind == "channel" and st.static_index.tolist() == [1] and st.dynamic_index.tolist() == [0, 2]
    assert st.order.tolist() == [1, 0, 2]
    # grouped (not depthwise) convs use the element path
    assert MaskStructure.from_mask(torch.ones(4, 2, 1, 1).index_fill(0, torch.tensor([1]), 0), groups=2,
                                   in_channels=4).kind == "element"


def test_channels_last_preserved_on_fast_paths():
    for kind in KINDS:
        layer = make_masked_layer(kind).float()
        x = torch.randn(3, 6, 8, 8)
        y = layer(x)
        y_cl = layer(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# deploy form plans
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_compact_plans_match_pad_layer(kind, groups, bias):
    layer = make_masked_layer(kind, groups=groups, bias=bias).eval()
    compact = CompactDynamicConv2d(layer)
    assert compact.mask_structure().kind == kind
    x1 = torch.randn(1, layer.in_channels, 6, 6, dtype=torch.double)  # batch 1 has its own plan details
    torch.testing.assert_close(compact(x1), layer_reference(layer, x1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x1), layer_reference(layer, x1), rtol=1e-10, atol=1e-10)
    x = torch.randn(3, layer.in_channels, 6, 6, dtype=torch.double)
    ref = layer_reference(layer, x)
    torch.testing.assert_close(compact(x), ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref, rtol=1e-10, atol=1e-10)
    m = layer.mode_mask
    stored = compact.weight.static_values.numel() + compact.weight.dynamic_values.numel()
    assert stored == int((1 - m).sum() + layer.num_kernels * m.sum())
    for backend in BACKENDS:  # explicit backends take the literal dense path
        c2 = copy.deepcopy(compact)
        c2.backend = backend
        torch.testing.assert_close(c2(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_inference_static_folding_only_for_softmax(routing):
    """Inference folds W_s into every W_k only when the routing weights sum to one."""
    layer = make_masked_layer("element", routing=routing, bias=False).eval()
    compact = CompactDynamicConv2d(layer)
    x = torch.randn(3, 6, 5, 5, dtype=torch.double)
    ref = layer_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(compact(x), ref, rtol=1e-10, atol=1e-10)
        dyn, sta = compact._cached_dense_factors()
    assert (sta is None) == (routing == "softmax")


def test_compact_dense_cache_reused_and_invalidated():
    layer = make_masked_layer("element").eval()
    compact = CompactDynamicConv2d(layer)
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    with torch.no_grad():
        y0 = compact(x)
        first = compact._cached_dense_factors()
        assert compact._cached_dense_factors()[0] is first[0]  # reused, not re-materialised
        compact.weight.dynamic_values.mul_(2.0)  # in-place change bumps the version
        assert compact._cached_dense_factors()[0] is not first[0]
        y1 = compact(x)
    assert not torch.allclose(y0, y1)
    # with autograd the packed values get gradients (no stale cache involved), equal to the masked reference
    compact.weight.dynamic_values.grad = None
    y = compact(x)
    torch.testing.assert_close(y, y1)
    y.square().sum().backward()
    ref = copy.deepcopy(compact)
    ref.weight.dynamic_values.grad = ref.weight.static_values.grad = None
    dyn, sta = ref.dense_factors()  # masked_scatter path
    pi = ref.routing_weights(x)
    bias_dyn, bias_sta = ref._bias_parts()
    cf.dynamic_conv2d(x, pi, dyn, sta, bias_dyn, bias_sta, 1, 1, 1, 1).square().sum().backward()
    torch.testing.assert_close(compact.weight.dynamic_values.grad, ref.weight.dynamic_values.grad)
    torch.testing.assert_close(compact.weight.static_values.grad, ref.weight.static_values.grad)
    state = compact.state_dict()
    assert not any("cache" in k for k in state)


def test_channel_split_interleaved_channels_match_reference():
    torch.manual_seed(3)
    x = torch.randn(3, 5, 6, 6, dtype=torch.double)
    pi = torch.softmax(torch.randn(3, 2, dtype=torch.double), -1)
    dyn_rows = torch.randn(2, 3, 5, 3, 3, dtype=torch.double)
    sta_rows = torch.randn(6, 5, 3, 3, dtype=torch.double)
    order = torch.tensor([6, 0, 1, 7, 2, 3, 8, 4, 5])  # dynamic channels 0, 3, 6
    bias = torch.randn(9, dtype=torch.double)
    y = cf.channel_split_conv2d(x, pi, dyn_rows, sta_rows, order, bias, padding=1)
    full_dyn = torch.zeros(2, 9, 5, 3, 3, dtype=torch.double)
    full_sta = torch.zeros(9, 5, 3, 3, dtype=torch.double)
    full_dyn[:, [0, 3, 6]] = dyn_rows
    full_sta[[1, 2, 4, 5, 7, 8]] = sta_rows
    ref = per_sample_reference(x, pi, full_dyn, full_sta, 1, 1, 1, 1) + bias[:, None, None]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padded", [0, 3])
def test_merge_split_outputs_equals_cat_then_index_select(channels_last, padded):
    """The one-pass merge gives ``cat([ys, yd]).index_select(order)`` exactly, padded static columns skipped,
    in the parts' memory format, with the same gradients."""
    torch.manual_seed(5)
    n_sta, n_dyn = 6, 4
    ys = torch.randn(3, n_sta + padded, 5, 4, dtype=torch.double)
    yd = torch.randn(3, n_dyn, 5, 4, dtype=torch.double)
    if channels_last:
        ys, yd = (t.contiguous(memory_format=torch.channels_last) for t in (ys, yd))
    ys.requires_grad_(True)
    yd.requires_grad_(True)
    columns = torch.cat([torch.arange(n_sta), torch.arange(n_dyn) + n_sta + padded])
    order = columns[torch.randperm(n_sta + n_dyn)]
    y = channel_split.merge_split_outputs(ys, yd, order)
    ref = torch.cat([ys, yd], dim=1).index_select(1, order)
    assert torch.equal(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (ys, yd), g)
    want = torch.autograd.grad(ref, (ys, yd), g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.all(got[0][:, n_sta:] == 0)  # the padded columns get no gradient


def test_channel_split_conv_keeps_channels_last_and_matches_nchw():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 6, 6, dtype=torch.double)
    pi = torch.softmax(torch.randn(3, 2, dtype=torch.double), -1)
    dyn_rows = torch.randn(2, 3, 5, 3, 3, dtype=torch.double)
    sta_rows = torch.randn(6, 5, 3, 3, dtype=torch.double)
    order = torch.tensor([6, 0, 1, 7, 2, 3, 8, 4, 5])
    y = cf.channel_split_conv2d(x, pi, dyn_rows, sta_rows, order, None, padding=1, backend="bmm")
    y_cl = cf.channel_split_conv2d(x.contiguous(memory_format=torch.channels_last), pi, dyn_rows, sta_rows, order,
                                   None, padding=1, backend="bmm")
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    torch.testing.assert_close(y_cl, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded", [0, 2])
def test_channel_split_batch_one_assembles_the_kernel_with_gradients(padded):
    """Batch 1 assembles one kernel (static rows and mixed dynamic rows interleaved in one pass): outputs and
    every gradient equal the per-sample reference on the dense factors (float64), padded static rows skipped."""
    torch.manual_seed(6)
    x = torch.randn(1, 5, 6, 6, dtype=torch.double, requires_grad=True)
    logits = torch.randn(1, 2, dtype=torch.double, requires_grad=True)
    dyn_rows = torch.randn(2, 3, 5, 3, 3, dtype=torch.double, requires_grad=True)
    sta_rows = torch.randn(6, 5, 3, 3, dtype=torch.double, requires_grad=True)
    order = torch.tensor([6, 0, 1, 7, 2, 3, 8, 4, 5])
    sta_run = sta_rows
    if padded:
        sta_run = torch.cat([sta_rows, sta_rows.new_zeros(padded, 5, 3, 3)])
        order = torch.where(order >= 6, order + padded, order)
    pi = torch.softmax(logits, -1)
    y = cf.channel_split_conv2d(x, pi, dyn_rows, sta_run, order, None, padding=1)
    dense_dyn = torch.zeros(2, 9, 5, 3, 3, dtype=torch.double).index_copy(1, torch.tensor([0, 3, 6]), dyn_rows)
    dense_sta = torch.zeros(9, 5, 3, 3, dtype=torch.double).index_copy(0, torch.tensor([1, 2, 4, 5, 7, 8]),
                                                                        sta_rows)
    ref = per_sample_reference(x, pi, dense_dyn, dense_sta, 1, 1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    leaves = (x, logits, dyn_rows, sta_rows)
    for a, b in zip(torch.autograd.grad(y, leaves, g, retain_graph=True), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size, path", [(6, "split"), (16, "dense")])
def test_channel_split_picks_dense_path_for_wide_outputs(size, path, monkeypatch):
    """Many output pixels per sample (grouped-conv territory): one dynamic conv over all channels."""
    layer = make_masked_layer("channel", bias=True).eval()
    compact = CompactDynamicConv2d(layer)
    calls = []
    real = cf.dynamic_conv2d

    def spy(x, pi, dyn, *args, **kwargs):
        calls.append(dyn.shape[1])
        return real(x, pi, dyn, *args, **kwargs)

    monkeypatch.setattr(channel_split, "dynamic_conv2d", spy)
    monkeypatch.setattr(dynamic_conv_module, "dynamic_conv2d", spy)  # the layer's own (cached-factor) dense call
    x = torch.randn(3, 6, size, size, dtype=torch.double)
    n_dyn = int(layer.mode_mask[:, 0, 0, 0].sum())
    expected = layer.out_channels if path == "dense" else n_dyn
    with torch.no_grad():
        y = compact(x)
    torch.testing.assert_close(y, layer_reference(layer, x), rtol=1e-10, atol=1e-10)
    assert calls[0] == expected
    # the functional form takes the same decision
    calls.clear()
    st = compact.mask_structure()
    k, shape = compact.weight.num_factors, compact._kernel_shape()
    dyn_rows = compact.weight.dynamic_values.view(k, n_dyn, *shape[1:])
    sta_rows = compact.weight.static_values.view(shape[0] - n_dyn, *shape[1:])
    with torch.no_grad():
        pi = compact.routing_weights(x)
        bias_dyn, bias_sta = compact._bias_parts()
        bias = cf.mix_bias(pi, bias_dyn, bias_sta) if bias_dyn is not None else bias_sta
        y2 = cf.channel_split_conv2d(x, pi, dyn_rows, sta_rows, st.order, bias, 1, 1, 1, 1)
    assert calls[0] == expected
    assert cf.channel_split_runs_dense(x, pi, dyn_rows, 1, 1, 1, 1) == (path == "dense")
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)


def test_compact_channel_plan_uses_views_of_packed_values():
    layer = make_masked_layer("channel", bias=False).eval()
    compact = CompactDynamicConv2d(layer)
    compact.weight.static_values.requires_grad_(True)
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    compact(x).sum().backward()
    assert compact.weight.static_values.grad.shape == compact.weight.static_values.shape


# --------------------------------------------------------------------------------------------
# MoE dispatch
# --------------------------------------------------------------------------------------------


def per_token_reference(x, idx, gates, w_in, b_in, w_out, b_out, act):
    out = torch.zeros(x.shape[0], w_out.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            h = act(w_in[e] @ x[n] + (0 if b_in is None else b_in[e]))
            out[n] += gates[n, j] * (w_out[e] @ h + (0 if b_out is None else b_out[e]))
    return out


@pytest.mark.parametrize("impl", ["sorted", "dense", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_moe_dispatch_paths_match_per_token_reference(impl, bias):
    torch.manual_seed(0)
    n, h, i, e, k = 23, 6, 5, 4, 2
    x = torch.randn(n, h, dtype=torch.double, requires_grad=True)
    idx, gates, _ = route_tokens(torch.randn(n, e, dtype=torch.double), k)
    idx[0] = torch.tensor([3, 1])  # make sure an expert sees few tokens
    w_in = torch.randn(e, i, h, dtype=torch.double, requires_grad=True)
    w_out = torch.randn(e, h, i, dtype=torch.double, requires_grad=True)
    b_in = torch.randn(e, i, dtype=torch.double, requires_grad=True) if bias else None
    b_out = torch.randn(e, h, dtype=torch.double, requires_grad=True) if bias else None
    gates = gates.clone().requires_grad_(True)
    ref = per_token_reference(x, idx, gates, w_in, b_in, w_out, b_out, torch.tanh)
    y = moe_dispatch(x, idx, gates, w_in, b_in, w_out, b_out, torch.tanh, impl=impl)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (x, gates, w_in, b_in, w_out, b_out) if t is not None]
    gy = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(moe_dispatch(x, idx, gates, w_in, b_in, w_out, b_out, torch.tanh, impl=impl),
                                   ref, rtol=1e-12, atol=1e-12)


def test_moe_dispatch_unused_expert_empty_and_bad_impl():
    torch.manual_seed(1)
    x = torch.randn(5, 4)
    idx = torch.tensor([[0, 1]] * 5)  # experts 2, 3 unused
    gates = torch.full((5, 2), 0.5)
    w_in, w_out = torch.randn(4, 3, 4), torch.randn(4, 4, 3)
    a = moe_dispatch(x, idx, gates, w_in, None, w_out, None, torch.relu)
    b = moe_dispatch(x, idx, gates, w_in, None, w_out, None, torch.relu, impl="dense")
    torch.testing.assert_close(a, b)
    assert moe_dispatch(x[:0], idx[:0], gates[:0], w_in, None, w_out, None, torch.relu).shape == (0, 4)
    with pytest.raises(ValueError, match="impl"):
        moe_dispatch(x, idx, gates, w_in, None, w_out, None, torch.relu, impl="grouped")


def test_moe_dispatch_auto_is_one_function_for_ops_and_layers(monkeypatch):
    import padnet.layers.moe as layers_moe
    import padnet.ops.moe_dispatch as ops_moe
    from padnet.ops.exporting import export_mode

    assert layers_moe.moe_dispatch is ops_moe.moe_dispatch and layers_moe.DISPATCH_IMPLS == ops_moe.DISPATCH_IMPLS
    torch.manual_seed(2)
    x, idx, gates = torch.randn(6, 4), torch.tensor([[0, 2]] * 6), torch.full((6, 2), 0.5)
    w_in, w_out = torch.randn(3, 5, 4), torch.randn(3, 4, 5)
    used = []
    real_dense = ops_moe._dense_dispatch
    monkeypatch.setattr(ops_moe, "_dense_dispatch", lambda *a: used.append("dense") or real_dense(*a))
    eager = ops_moe.moe_dispatch(x, idx, gates, w_in, None, w_out, None, torch.relu)  # auto: sorted
    assert used == []
    with export_mode():
        exported = ops_moe.moe_dispatch(x, idx, gates, w_in, None, w_out, None, torch.relu)  # auto: dense
    assert used == ["dense"]
    torch.testing.assert_close(exported, eager)


def test_moe_layer_uses_dense_path_when_exporting():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=2).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.double)
    y = moe(x)
    with cf.export_mode():
        y_dense = moe(x)
    torch.testing.assert_close(y_dense, y, rtol=1e-12, atol=1e-12)


def test_masked_factors_match_plain_products_with_gradients():
    """The memory-lean element-mask factors: same values and gradients as combine_factors, float64."""
    from padnet.layers.modes import combine_factors
    from padnet.ops.masked_factors import masked_factors

    torch.manual_seed(0)
    dynamic = torch.randn(3, 5, 4, 3, 3, dtype=torch.double, requires_grad=True)
    static = torch.randn(5, 4, 3, 3, dtype=torch.double, requires_grad=True)
    mask = (torch.rand(5, 4, 3, 3) < 0.3).double()
    phi = torch.tensor(0.3, dtype=torch.double, requires_grad=True)
    leaves = [dynamic, static, phi]
    g_dyn, g_sta = torch.randn_like(dynamic), torch.randn_like(static)
    outs, grads = [], []
    for fn in (combine_factors, masked_factors):
        lambda_d = 2 * torch.sigmoid(phi)
        dyn, sta = fn(dynamic, static, mask, 2 - lambda_d, lambda_d)
        outs.append((dyn, sta))
        grads.append(torch.autograd.grad((dyn * g_dyn).sum() + (sta * g_sta).sum(), leaves))
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # only one of the two outputs used, and no scale parameter
    one = torch.ones((), dtype=torch.double)
    dyn, _ = masked_factors(dynamic, static, mask, one, one)
    g, = torch.autograd.grad(dyn.sum(), [dynamic])
    torch.testing.assert_close(g, mask.expand_as(dynamic))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups, batch", [(1, 3), (2, 3), (1, 1)])
@pytest.mark.parametrize("softmax", [False, True])
def test_masked_conv_matches_general_path_with_gradients(backend, groups, batch, softmax, monkeypatch):
    """Element-mask training conv from the parameters: every backend, values and gradients (float64).

    ``softmax`` (``routing_sums_to_one``): the static part is folded into the K factors, which changes
    ``dL/dpi`` by the same amount in every column and so leaves the gradient of the routing logits
    unchanged: the leaves are the logits there.
    """
    from padnet.layers.modes import combine_factors
    from padnet.ops import masked_conv

    monkeypatch.setattr(masked_conv, "resolve_backend", lambda *args, **kwargs: backend)
    torch.manual_seed(0)
    x = torch.randn(batch, 4, 6, 5, dtype=torch.double, requires_grad=True)
    logits = torch.randn(batch, 3, dtype=torch.double, requires_grad=True)
    pi = torch.softmax(logits, -1) if softmax else torch.sigmoid(logits)
    dynamic = torch.randn(3, 6, 4 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    static = torch.randn(6, 4 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    mask = (torch.rand(6, 4 // groups, 3, 3) < 0.4).double()
    phi = torch.tensor(-0.4, dtype=torch.double, requires_grad=True)
    bias_sta = torch.randn(6, dtype=torch.double, requires_grad=True)
    leaves = [x, logits, dynamic, static, phi, bias_sta]
    gy = torch.randn(batch, 6, 3, 3, dtype=torch.double)
    lambda_d = 2 * torch.sigmoid(phi)
    y = masked_conv.masked_dynamic_conv2d(x, pi, dynamic, static, mask, 2 - lambda_d, lambda_d, None, bias_sta,
                                          2, 1, 1, groups, routing_sums_to_one=softmax)
    dyn, sta = combine_factors(dynamic, static, mask, 2 - lambda_d, lambda_d)
    ref = per_sample_reference(x, pi, dyn, sta, 2, 1, 1, groups) + bias_sta[:, None, None]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in grads)  # every leaf, the scale included, is reached


@pytest.mark.parametrize("fused", ["1", "0"])  # the compiled kernels (built on first use), and aten ops
@pytest.mark.parametrize("softmax", [False, True])
def test_masked_bmm_forms_and_maps_factors_tile_by_tile(tiny_tiles, softmax, fused, monkeypatch):
    """The tiled element-mask conv with many batch and channel tiles: the factors are formed per channel
    tile (by MKL's GEMMs over formed columns, or inside the compiled kernels for folded factors) and
    each tile's gradient is mapped as soon as the last batch tile completed it; values and every
    gradient (scales included) equal the literal formula (float64), and the tiles really were formed
    and mapped one range at a time."""
    from padnet.layers.modes import combine_factors
    from padnet.ops import masked_conv, masked_factors

    monkeypatch.setenv("PADNET_FUSED", fused)
    monkeypatch.setattr(masked_conv, "resolve_backend", lambda *args, **kwargs: "bmm")
    formed, mapped, paths = [], [], set()
    cls = masked_factors.ElementFactors
    real_columns, real_map, real_mix, real_pass = cls.columns, cls.map_grads, cls.mix, cls.grad_pass
    monkeypatch.setattr(cls, "columns", lambda self, lo, hi: formed.append((lo, hi)) or paths.add("columns")
                        or real_columns(self, lo, hi))
    monkeypatch.setattr(cls, "mix", lambda self, pi, lo, hi, out: formed.append((lo, hi)) or paths.add("mix")
                        or real_mix(self, pi, lo, hi, out))
    monkeypatch.setattr(cls, "map_grads", lambda self, g, lo, hi: mapped.append((lo, hi)) or real_map(self, g, lo, hi))

    def spy_pass(self, gw, pi, g, accumulate, last, gpi, lo, hi):
        if last:
            mapped.append((lo, hi))
        return real_pass(self, gw, pi, g, accumulate, last, gpi, lo, hi)

    monkeypatch.setattr(cls, "grad_pass", spy_pass)
    torch.manual_seed(3)
    x = torch.randn(5, 4, 6, 5, dtype=torch.double, requires_grad=True)
    logits = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    pi = torch.softmax(logits, -1) if softmax else torch.sigmoid(logits)
    dynamic = torch.randn(3, 7, 4, 3, 3, dtype=torch.double, requires_grad=True)
    static = torch.randn(7, 4, 3, 3, dtype=torch.double, requires_grad=True)
    mask = (torch.rand(7, 4, 3, 3) < 0.4).double()
    phi = torch.tensor(0.2, dtype=torch.double, requires_grad=True)
    leaves = [x, logits, dynamic, static, phi]
    gy = torch.randn(5, 7, 6, 5, dtype=torch.double)
    lambda_d = 2 * torch.sigmoid(phi)
    y = masked_conv.masked_dynamic_conv2d(x, pi, dynamic, static, mask, 2 - lambda_d, lambda_d, padding=1,
                                          routing_sums_to_one=softmax)
    grads = torch.autograd.grad(y, leaves, gy, retain_graph=True)  # pi and the scales are shared with ref
    dyn, sta = combine_factors(dynamic, static, mask, 2 - lambda_d, lambda_d)
    ref = per_sample_reference(x, pi, dyn, sta, 1, 1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    # folded factors (softmax routing) with the build: applied inside the compiled kernels only
    compiled = bmm_kernels.compiled_factor_gemms(torch.float64, torch.device("cpu"), 3) is not None
    if fused == "1" and not compiled:
        pytest.skip("the compiled library could not be built here")
    assert paths == ({"mix"} if softmax and fused == "1" else {"columns"})
    ck = 4 * 3 * 3
    assert len(set(formed)) > 1 and all((lo % ck, hi % ck) == (0, 0) for lo, hi in formed)
    assert sorted(mapped) == sorted(set(mapped)) and len(mapped) > 1  # each channel tile mapped once
    covered = sorted(mapped)
    assert covered[0][0] == 0 and covered[-1][1] == 7 * ck
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # the tiles partition the columns


def test_masked_bmm_tiled_gradients_do_not_depend_on_the_thread_count(tiny_tiles, at_one_and_two_threads):
    """The scales' gradients are summed per tile in tile order: bit for bit the same with 1 and 2 threads."""
    from padnet.ops import masked_conv

    torch.manual_seed(4)
    x = torch.randn(4, 6, 8, 8)
    logits = torch.randn(4, 3)
    dynamic = torch.randn(3, 9, 6, 3, 3, requires_grad=True)
    static = torch.randn(9, 6, 3, 3, requires_grad=True)
    mask = (torch.rand(9, 6, 3, 3) < 0.3).float()
    phi = torch.tensor(0.1, requires_grad=True)

    def grads():
        lambda_d = 2 * torch.sigmoid(phi)
        y = masked_conv.MaskedWeightSpaceBMM.apply(x, torch.softmax(logits, -1), dynamic, static, mask,
                                                   2 - lambda_d, lambda_d, backend_selection.conv_geometry((3, 3), 1, 1, 1, 1),
                                                   True)
        return torch.autograd.grad((y * y).sum(), [dynamic, static, phi])

    one, two = at_one_and_two_threads(grads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_masked_conv_output_space_folds_static_for_softmax_routing(groups, monkeypatch):
    """``routing_sums_to_one``: the output-space backend runs K convs (static part folded into every factor);
    values and the gradients of every parameter (routing logits included) equal the unfolded formula."""
    from padnet.layers.modes import combine_factors
    from padnet.ops import conv_backends, masked_conv

    monkeypatch.setattr(masked_conv, "resolve_backend", lambda *args, **kwargs: "output")
    seen = []
    real = conv_backends.run_backend
    monkeypatch.setattr(masked_conv, "run_backend",
                        lambda name, x, pi, dyn, sta, *a: seen.append(sta is None) or real(name, x, pi, dyn, sta, *a))
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 5, dtype=torch.double, requires_grad=True)
    logits = torch.randn(3, 3, dtype=torch.double, requires_grad=True)
    dynamic = torch.randn(3, 6, 4 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    static = torch.randn(6, 4 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    mask = (torch.rand(6, 4 // groups, 3, 3) < 0.4).double()
    phi = torch.tensor(0.3, dtype=torch.double, requires_grad=True)
    leaves = [x, logits, dynamic, static, phi]
    gy = torch.randn(3, 6, 3, 3, dtype=torch.double)
    lambda_d = 2 * torch.sigmoid(phi)
    pi = torch.softmax(logits, -1)
    y = masked_conv.masked_dynamic_conv2d(x, pi, dynamic, static, mask, 2 - lambda_d, lambda_d, None, None,
                                          2, 1, 1, groups, routing_sums_to_one=True)
    assert seen == [True]  # K convs: no separate static part reached the backend
    dyn, sta = combine_factors(dynamic, static, mask, 2 - lambda_d, lambda_d)
    ref = per_sample_reference(x, pi, dyn, sta, 2, 1, 1, groups)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(y, leaves, gy, retain_graph=True), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("element", [False, True])
def test_empty_batch_gives_zero_weight_gradients(element):
    """A batch of zero samples through the tiled backward (the rule's choice with autograd at small
    outputs): every parameter gradient is exactly zero, never uninitialised memory."""
    from padnet.layers import DynamicConv2d

    torch.manual_seed(0)
    layer = DynamicConv2d(4, 8, 3, padding=1).train()
    if element:
        layer.mode_mask.copy_((torch.rand_like(layer.mode_mask) < 0.3).float())
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), name


def test_single_sample_conv_keeps_its_weight_when_only_the_input_needs_grad():
    """Batch 1 through the functional API with fixed routing and kernels and an input that needs a
    gradient (saliency): the conv saves its weight for the input gradient, so that weight must not be a
    workspace a second call overwrites."""
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(1, 3), -1)
    dyn, sta = torch.randn(3, 5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    x1, x2 = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(1, 4, 6, 6, requires_grad=True)
    y1 = cf.dynamic_conv2d(x1, pi, dyn, sta, None, None, 1, 1)
    cf.dynamic_conv2d(x2, pi * 0.5, dyn * 2, None, None, None, 1, 1)  # would overwrite a shared workspace
    g, = torch.autograd.grad(y1.sum(), x1)
    w = torch.einsum("bk,k...->b...", pi, dyn)[0] + sta
    ref, = torch.autograd.grad(F.conv2d(x1, w, None, 1, 1).sum(), x1)
    torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("batch", [1, 4])
def test_inference_mode_then_no_grad_reuses_workspaces(batch):
    """Workspaces first allocated under torch.inference_mode (inference tensors) are replaced, not
    written, by a later call outside that mode; results agree across the modes."""
    from padnet.layers import DynamicConv2d
    from padnet.ops import workspace as ws

    ws._LOCAL.__dict__.clear()  # this thread's buffers start empty, so the first call creates them
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1).eval()
    layer.mode_mask.copy_((torch.rand_like(layer.mode_mask) < 0.3).float())
    x = torch.randn(batch, 4, 7, 7)
    with torch.inference_mode():
        a = layer(x).clone()
    with torch.no_grad():
        b = layer(x)
    layer.train()
    c = layer(x)  # training uses the factor workspaces
    c.sum().backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.detach(), b, rtol=1e-5, atol=1e-6)


def test_masked_conv_tunes_with_grad_when_only_the_dynamic_weights_train(monkeypatch):
    """The backend is resolved with autograd on when any parameter needs a gradient, including only the
    dynamic kernels (the static weight and scales frozen)."""
    from padnet.ops import masked_conv

    seen = []
    real = masked_conv.resolve_backend

    def spy(x, pi, dyn, sta, *args, **kwargs):
        seen.append(dyn.requires_grad or pi.requires_grad or x.requires_grad)
        return real(x, pi, dyn, sta, *args, **kwargs)

    monkeypatch.setattr(masked_conv, "resolve_backend", spy)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6)
    pi = torch.softmax(torch.randn(3, 2), -1)
    dynamic = torch.randn(2, 5, 4, 3, 3, requires_grad=True)
    static = torch.randn(5, 4, 3, 3)
    mask = (torch.rand(5, 4, 3, 3) < 0.4).float()
    one = torch.ones(())
    y = masked_conv.masked_dynamic_conv2d(x, pi, dynamic, static, mask, one, one, padding=1,
                                          routing_sums_to_one=True)
    assert seen == [True]
    y.sum().backward()
    assert dynamic.grad is not None and static.grad is None


def test_aligned_static_rows_pads_to_whole_blocks_only_when_cheap():
    order = torch.randperm(33)  # columns 0-30 static, 31-32 dynamic
    sta = torch.randn(31, 3, 3, 3)
    padded, new_order = channel_split.aligned_static_rows(sta, order)
    assert padded.shape[0] == 32 and torch.equal(padded[:31], sta) and not padded[31].any()
    assert torch.equal(new_order, torch.where(order >= 31, order + 1, order))  # dynamic columns shift by one
    few = torch.randn(45, 3, 3, 3)  # 45 -> 64 would add 42 %: unchanged
    same, same_order = channel_split.aligned_static_rows(few, torch.arange(50))
    assert same is few and torch.equal(same_order, torch.arange(50))
    whole = torch.randn(64, 3, 3, 3)
    assert channel_split.aligned_static_rows(whole, torch.arange(70))[0] is whole


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_channel_plans_with_padded_static_rows_match_the_reference(compact, batch):
    """40 outputs, 9 dynamic: the 31 static rows are padded to 32 for inference; outputs are unchanged."""
    torch.manual_seed(7)
    layer = DynamicConv2d(5, 40, 3, padding=1, bias=True).double()
    rows = torch.zeros(40)
    rows[torch.randperm(40)[:9]] = 1
    layer.set_mode_mask("weight", rows.view(-1, 1, 1, 1).expand(layer.mode_mask.shape).clone())
    layer.set_mode_mask("bias", (torch.rand(40) < 0.5).double())
    layer.eval()
    model = CompactDynamicConv2d(layer) if compact else layer
    x = torch.randn(batch, 5, 6, 6, dtype=torch.double)
    ref = layer_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
        if batch > 1:
            cache = model.__dict__["_inference_cache"]
            sta_rows = cache["aligned_rows"][1][0] if compact else cache["plan"][1][1][1]
            assert sta_rows.shape[0] == 32
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)  # with autograd: unpadded rows


def test_compact_channel_plan_keeps_its_padded_rows_and_dense_factors_cached(monkeypatch):
    """The padded static rows live beside the inference cache: a dense plan's factors do not evict them."""
    calls = []
    real = channel_split.aligned_static_rows
    from padnet.layers import dynamic_conv as layer_module
    monkeypatch.setattr(layer_module, "aligned_static_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(layer_module, "channel_split_runs_dense", lambda *a, **k: True)  # force the dense plan
    torch.manual_seed(9)
    layer = DynamicConv2d(5, 40, 3, padding=1).double()
    rows = torch.zeros(40)
    rows[:9] = 1
    layer.set_mode_mask("weight", rows.view(-1, 1, 1, 1).expand(layer.mode_mask.shape).clone())
    compact = CompactDynamicConv2d(layer.eval())
    x = torch.randn(3, 5, 6, 6, dtype=torch.double)
    with torch.no_grad():
        ys = [compact(x) for _ in range(4)]
    assert calls == [1]
    for y in ys:
        torch.testing.assert_close(y, layer_reference(layer, x), rtol=1e-10, atol=1e-10)
