"""DynamicConv2d against a plain per-sample reference computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers import CompactDynamicConv2d, DynamicConv2d


def reference(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loop, formula written out from the raw parameters (docs/design.md 1)."""
    logits = layer.attention.fc2(F.relu(layer.attention.fc1(x.mean(dim=(2, 3)))))
    z = logits / layer.temperature
    pi = torch.softmax(z, -1) if layer.routing == "softmax" else torch.sigmoid(z)
    if layer.scale.phi is None:
        lam_d = lam_s = torch.tensor(1.0, dtype=x.dtype)
    else:
        lam_d = 2 * torch.sigmoid(layer.scale.phi)
        lam_s = 2 - lam_d
    M = layer.mode_mask
    outs = []
    for b in range(x.shape[0]):
        mixed = sum(pi[b, k] * layer.weight_dynamic[k] for k in range(layer.num_kernels))
        w = lam_d * M * mixed + lam_s * (1 - M) * layer.weight_static
        bias = None
        if layer.bias_dynamic is not None:
            mb = layer.bias_mode_mask
            bmix = sum(pi[b, k] * layer.bias_dynamic[k] for k in range(layer.num_kernels))
            bias = lam_d * mb * bmix + lam_s * (1 - mb) * layer.bias_static
        outs.append(F.conv2d(x[b : b + 1], w, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def make_layer(groups=1, bias=False, mask="random", phi=0.4, routing="softmax", scale="learned", **kw):
    torch.manual_seed(0)
    cin, cout = (8, 8) if groups == 8 else (8, 12)
    layer = DynamicConv2d(cin, cout, 3, padding=1, groups=groups, bias=bias, routing=routing, scale=scale, **kw)
    layer = layer.double()
    with torch.no_grad():
        for g in layer.mode_groups():
            if mask == "random":
                g.mask.copy_((torch.rand_like(g.mask) < 0.4).double())
            else:
                g.mask.fill_(1.0 if mask == "ones" else 0.0)
        if layer.scale.phi is not None:
            layer.scale.phi.fill_(phi)
    return layer


CASES = [
    dict(groups=1, bias=False),
    dict(groups=2, bias=True),
    dict(groups=8, bias=True),  # depthwise
    dict(groups=1, bias=True, routing="sigmoid"),
    dict(groups=1, bias=False, scale="none"),
    dict(groups=1, bias=False, stride=2, dilation=2),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["weight", "output"])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_per_sample_reference(case, backend, batch):
    layer = make_layer(backend=backend, **case)
    layer.temperature = 3.0
    x = torch.randn(batch, 8, 9, 9, dtype=torch.double)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_all_dynamic_mask_is_plain_dynamic_conv():
    layer = make_layer(mask="ones", phi=0.0)
    x = torch.randn(3, 8, 6, 6, dtype=torch.double)
    pi = layer.routing_weights(x)
    expected = torch.cat([
        F.conv2d(x[b : b + 1], torch.einsum("k,k...->...", pi[b], layer.weight_dynamic), padding=1) for b in range(3)
    ])
    torch.testing.assert_close(layer(x), expected)


def test_all_static_mask_is_static_conv_with_lambda_s():
    layer = make_layer(mask="zeros", phi=0.7, bias=True)
    x = torch.randn(3, 8, 6, 6, dtype=torch.double)
    lam_s = 2 - 2 * torch.sigmoid(torch.tensor(0.7, dtype=torch.double))
    expected = F.conv2d(x, lam_s * layer.weight_static, lam_s * layer.bias_static, padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_scales_start_at_one_and_sum_to_two():
    layer = DynamicConv2d(4, 4, 3)
    lam_s, lam_d = layer.scales()
    assert lam_s.item() == 1.0 and lam_d.item() == 1.0
    with torch.no_grad():
        layer.scale.phi.fill_(1.3)
    lam_s, lam_d = layer.scales()
    assert torch.isclose(lam_s + lam_d, torch.tensor(2.0))


def test_dead_entries_get_zero_gradient_and_live_ones_do():
    layer = make_layer(bias=True)
    # per-channel offsets so the pooled routing input is far from zero (ReLU units active)
    x = torch.randn(4, 8, 7, 7, dtype=torch.double) + 3 * torch.randn(4, 8, 1, 1, dtype=torch.double)
    layer(x).square().sum().backward()
    M = layer.mode_mask.bool()
    assert torch.all(layer.weight_dynamic.grad[:, ~M] == 0)
    assert torch.all(layer.weight_static.grad[M] == 0)
    assert torch.all(layer.weight_dynamic.grad[:, M] != 0)
    assert torch.all(layer.weight_static.grad[~M] != 0)
    mb = layer.bias_mode_mask.bool()
    assert torch.all(layer.bias_dynamic.grad[:, ~mb] == 0) and torch.all(layer.bias_static.grad[mb] == 0)
    assert layer.scale.phi.grad is not None and layer.scale.phi.grad != 0
    for p in layer.attention.parameters():
        assert p.grad is not None and torch.any(p.grad != 0)


def test_routing_weights_shape_and_temperature():
    layer = DynamicConv2d(6, 6, 1, num_kernels=5)
    x = torch.randn(3, 6, 4, 4)
    pi = layer.routing_weights(x)
    assert pi.shape == (3, 5)
    torch.testing.assert_close(pi.sum(-1), torch.ones(3))
    layer.temperature = 1e4
    torch.testing.assert_close(layer.routing_weights(x), torch.full((3, 5), 0.2), atol=1e-3, rtol=0)


def test_channels_last_input():
    layer = make_layer(bias=True).float()
    x = torch.randn(4, 8, 9, 9)
    y = layer(x)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    layer = make_layer(bias=True)
    x = torch.randn(4, 8, 9, 9, dtype=torch.double)
    ref = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("batch", [1, 2])
def test_channel_split_conv_under_cpu_bfloat16_autocast(batch):
    """The functional channel split with the tiled GEMM (float32 out of its autograd function) beside a bf16
    static conv: the one-pass merge promotes like ``cat``; values and gradients match float32."""
    from padnet import ops

    torch.manual_seed(0)
    x = torch.randn(batch, 5, 6, 6, requires_grad=True)
    pi = torch.softmax(torch.randn(batch, 2), -1)
    dyn_rows = torch.randn(2, 3, 5, 3, 3, requires_grad=True)
    sta_rows = torch.randn(6, 5, 3, 3, requires_grad=True)
    order = torch.tensor([6, 0, 1, 7, 2, 3, 8, 4, 5])
    leaves = (x, dyn_rows, sta_rows)
    ref = ops.channel_split_conv2d(x, pi, dyn_rows, sta_rows, order, None, padding=1, backend="bmm")
    g_ref = torch.autograd.grad(ref.sum(), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.channel_split_conv2d(x, pi, dyn_rows, sta_rows, order, None, padding=1, backend="bmm")
    g = torch.autograd.grad(y.float().sum(), leaves)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=1e-1)
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=6e-2)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("batch, backend", [(1, "auto"), (3, "bmm"), (3, "weight"), (3, "output")])
def test_channel_layer_under_cpu_bfloat16_autocast(batch, backend, compact):
    """A channel-structured layer (whole output channels static or dynamic) under ``torch.autocast("cpu",
    bfloat16)``: the static and dynamic parts can come out in different dtypes (a bf16 conv beside a float32
    GEMM); the merge promotes them as ``cat`` does. Forward with and without autograd, gradients in the
    parameters' dtype and close to the float32 ones."""
    from padnet.layers import CompactDynamicConv2d

    torch.manual_seed(1)
    layer = DynamicConv2d(6, 10, 3, padding=1, num_kernels=3, backend=backend)
    rows = torch.zeros(10)
    rows[torch.randperm(10)[:3]] = 1
    layer.set_mode_mask("weight", rows.view(-1, 1, 1, 1).expand(layer.mode_mask.shape).clone())
    model = CompactDynamicConv2d(layer) if compact else layer
    x = torch.randn(batch, 6, 7, 7)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
        with torch.no_grad():
            y_eval = model.eval()(x)
    model.train()
    with torch.no_grad():
        expected = model(x)
    for out in (y, y_eval):
        torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for name, grad in got.items():
        assert grad.dtype == torch.float32, name
        scale = ref[name].abs().max().item() + 1e-6
        torch.testing.assert_close(grad / scale, ref[name] / scale, rtol=0, atol=6e-2, msg=name)


@pytest.mark.parametrize("batch", [1, 6])  # batch 1: MaskedAggregate; 6: the tiled masked GEMM (cost rule)
@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_element_training_under_cpu_bfloat16_autocast(batch, backward_inside, routing):
    """Mixed precision: an element-masked layer trains under ``torch.autocast("cpu", bfloat16)``, with
    backward() called after or inside the region; parameter gradients keep the parameters' dtype and
    stay close to the float32 ones (the kernels' gradient used to arrive in bfloat16 and fail)."""
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 12, 3, padding=1, num_kernels=3, routing=routing)
    with torch.no_grad():
        layer.mode_mask.copy_((torch.rand(layer.mode_mask.shape) < 0.3).float())
    x = torch.randn(batch, 8, 6, 6)
    layer(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    got = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and "weight_dynamic" in got
    for name, grad in got.items():
        assert grad.dtype == torch.float32, name
        scale = ref[name].abs().max().item() + 1e-6
        torch.testing.assert_close(grad / scale, ref[name] / scale, rtol=0, atol=6e-2, msg=name)


def test_from_conv_inherits_weights():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
    layer = DynamicConv2d.from_conv(conv, num_kernels=3, noise_std=0.0)
    torch.testing.assert_close(layer.weight_static, conv.weight)
    for k in range(3):
        torch.testing.assert_close(layer.weight_dynamic[k], conv.weight)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)  # pi sums to 1, all kernels equal
    noisy = DynamicConv2d.from_conv(conv, num_kernels=3, noise_std=0.05)
    assert not torch.equal(noisy.weight_dynamic[0], noisy.weight_dynamic[1])
    torch.testing.assert_close(noisy.weight_static, conv.weight)


def test_compact_matches_and_stores_only_live_entries():
    layer = make_layer(bias=True).float()
    x = torch.randn(4, 8, 9, 9)
    compact = CompactDynamicConv2d(layer)
    y, yc = layer(x), compact(x)
    assert ((yc - y).norm() / y.norm()) <= 1e-5
    M = layer.mode_mask
    stored = compact.weight.static_values.numel() + compact.weight.dynamic_values.numel()
    assert stored == int((1 - M).sum() + layer.num_kernels * M.sum())


def test_state_dict_round_trip():
    layer = make_layer(bias=True)
    fresh = DynamicConv2d(8, 12, 3, padding=1, bias=True).double()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 5, 5, dtype=torch.double)
    torch.testing.assert_close(fresh(x), layer(x))
    assert "mode_mask" in layer.state_dict() and "bias_mode_mask" in layer.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_kernels=0), "num_kernels"),
        (dict(groups=3), "groups"),
        (dict(routing="relu"), "routing"),
        (dict(scale="half"), "scale"),
        (dict(temperature=0.0), "temperature"),
        (dict(backend="cuda-magic"), "backend"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicConv2d(8, 8, 3, **kwargs)


def test_bad_input_shape_and_mask():
    layer = DynamicConv2d(8, 8, 3)
    with pytest.raises(ValueError, match="expects 8 input channels, got 5"):
        layer(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        layer(torch.randn(8, 6, 6))
    with pytest.raises(ValueError, match="shape"):
        layer.set_mode_mask("weight", torch.ones(3, 3))
    with pytest.raises(ValueError, match="0 or 1"):
        layer.set_mode_mask("weight", torch.full_like(layer.mode_mask, 0.5))
    with pytest.raises(KeyError, match="no mode group"):
        layer.set_mode_mask("bias", torch.ones(8))


def test_model_to_channels_last_after_dynamize_and_save_load(tmp_path):
    """``model.to(memory_format=torch.channels_last)`` used to fail on the 5-D ``weight_dynamic``; now each
    kernel is converted, the function and gradients are unchanged, and the file round-trips exactly."""
    import padnet

    def base():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2)).double()

    torch.manual_seed(0)
    model = base()
    padnet.dynamize_(model, padnet.PadConfig(target_modules=["0", "2"]))
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.to(memory_format=torch.channels_last)
    assert model[0].weight_dynamic.shape == (4, 8, 3, 3, 3)
    assert model[0].weight_dynamic[1].is_contiguous(memory_format=torch.channels_last)
    y = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    for g, r in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    path = tmp_path / "cl.safetensors"
    padnet.save(model, path)
    loaded = padnet.load(path, model=base())
    torch.testing.assert_close(loaded(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [1, 2])
def test_element_mask_training_chain_matches_reference_gradients(routing, groups):
    """Two element-masked layers of different shapes in a chain, ``backend="auto"`` (the training path
    whose factor matrices share per-thread workspaces): outputs and every parameter's gradient equal the
    per-sample reference, on two successive steps (the workspaces are reused, never read stale)."""
    torch.manual_seed(3)
    first = DynamicConv2d(8, 12, 3, padding=1, groups=groups, routing=routing).double().train()
    second = DynamicConv2d(12, 6, 3, padding=1, stride=2, groups=groups, routing=routing).double().train()
    with torch.no_grad():
        for layer in (first, second):
            layer.mode_mask.copy_((torch.rand_like(layer.mode_mask) < 0.3).double())
            layer.scale.phi.fill_(-0.3)
    params = [p for layer in (first, second) for p in layer.parameters()]
    for step in range(2):
        x = torch.randn(5, 8, 9, 9, dtype=torch.double)
        y = second(first(x))
        ref = reference(second, reference(first, x))
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad((y * y).sum(), params)
        for p, g, r in zip(params, grads, torch.autograd.grad((ref * ref).sum(), params)):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
        with torch.no_grad():  # an optimizer-like change between the steps
            for p, g in zip(params, grads):
                p.sub_(0.01 * g)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask", ["ones", "random", "channel"])
def test_batch_one_inference_path_follows_every_change(case, mask, monkeypatch):
    """The batch-1 deploy path (eval, no autograd) equals the per-sample reference for every layer kind,
    and re-derives its plan when a parameter, the mask or the temperature changes; channel masks and
    the states that need the general path (training statistics, a routing probe, export) take it."""
    import padnet.layers.dynamic_conv as dc
    from padnet.ops.exporting import export_mode
    from padnet.transforms.diagnostics import routing_probe

    calls = []
    real = dc.single_sample_conv
    monkeypatch.setattr(dc, "single_sample_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = make_layer(mask="random" if mask == "channel" else mask, **case).eval()
    if mask == "channel":
        with torch.no_grad():
            layer.mode_mask.zero_()[: layer.out_channels // 2] = 1.0
    x = torch.randn(1, 8, 9, 9, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)
        kind = layer.mask_structure().kind
        assert kind == {"ones": "ones", "random": "element"}.get(mask, kind)
        assert bool(calls) == (kind in ("ones", "element"))  # channel plans keep their split conv
        layer.weight_dynamic.add_(0.25)  # an optimizer step: same tensors, new versions
        layer.temperature = 3.0
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)
        if mask != "channel":
            layer.mode_mask.zero_()  # all static now: the general path's static plan
            calls.clear()
            torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)
            assert not calls
    layer.train()  # training statistics are kept by the general path, also without autograd
    before = int(layer.routing_updates)
    with torch.no_grad():
        layer(x)
    assert int(layer.routing_updates) == before + 1
    layer.eval()
    with routing_probe(layer) as seen, torch.no_grad():
        layer(x)
    assert sum(len(v) for v in seen.values()) == 1
    calls.clear()
    with export_mode(), torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)
    assert not calls


def test_inference_plan_follows_param_data_replacement():
    """``param.data = new`` keeps the version counter; the plan's key must still change even when the
    allocator hands the new storage the freed address of the old one (two replacements in a row)."""
    layer = make_layer(mask="ones").eval()
    x = torch.randn(1, 8, 9, 9, dtype=torch.double)
    for _ in range(20):
        with torch.no_grad():
            layer(x)  # caches the plan
            layer.weight_dynamic.data = layer.weight_dynamic.data * 2
            layer.weight_dynamic.data = layer.weight_dynamic.data * 0.75
            torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_batch_one_inference_checks_each_new_input_shape():
    layer = make_layer().eval()
    with torch.no_grad():
        for bad in (torch.tensor(1.0, dtype=torch.double), torch.randn(1, dtype=torch.double)):
            with pytest.raises(ValueError, match=r"expects input \[B, C, H, W\]"):
                layer(bad)
            with pytest.raises(ValueError, match=r"expects input \[B, C, H, W\]"):
                CompactDynamicConv2d(layer)(bad)
        layer(torch.randn(1, 8, 9, 9, dtype=torch.double))
        with pytest.raises(ValueError, match="expects 8 input channels, got 5"):
            layer(torch.randn(1, 5, 9, 9, dtype=torch.double))
        with pytest.raises(ValueError, match="smaller than the kernel"):
            DynamicConv2d(8, 4, 5).double().eval()(torch.randn(1, 8, 3, 3, dtype=torch.double))
        with pytest.raises(ValueError, match=r"expects input \[B, C, H, W\]"):
            layer(torch.randn(1, 8, 9, dtype=torch.double))
        layer(torch.randn(1, 8, 9, 9, dtype=torch.double))  # and the good shape still runs


def test_batch_one_inference_honours_a_subclass_routing_override():
    """A subclass that overrides the public ``routing_weights`` (e.g. an ablation with fixed routing) gets
    the same output at batch 1 without autograd as with it: the short path defers to the general one."""

    class UniformRouting(DynamicConv2d):
        def routing_weights(self, x):
            self._check_input(x)
            return torch.full((x.shape[0], self.num_kernels), 1.0 / self.num_kernels, dtype=x.dtype)

    torch.manual_seed(0)
    layer = UniformRouting(8, 12, 3, padding=1).double().eval()
    x = torch.randn(1, 8, 9, 9, dtype=torch.double)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, layer(x).detach(), rtol=1e-12, atol=1e-12)
    mixed = layer.weight_dynamic.mean(0) * layer.scales()[1].detach()
    torch.testing.assert_close(y, F.conv2d(x, mixed.detach(), None, 1, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask", ["ones", "random"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_compact_batch_one_path_equals_the_pad_layer(mask, bias, routing):
    """The deploy form's batch-1 path (bias and a folded BatchNorm's shift included) equals the PAD layer."""
    layer = make_layer(mask=mask, bias=bias, routing=routing).eval()
    bn = nn.BatchNorm2d(12).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    compact = CompactDynamicConv2d(layer).eval()
    x = torch.randn(1, 8, 9, 9, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), layer(x), rtol=1e-10, atol=1e-10)
        want = bn(layer(x))
        compact.fold_batchnorm_(bn)
        torch.testing.assert_close(compact(x), want, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match="expects 8 input channels"):
            compact(torch.randn(1, 3, 9, 9, dtype=torch.double))


@pytest.mark.parametrize("mask", ["ones", "random"])
def test_batch_one_inference_reuses_its_workspace_correctly(mask):
    """Deploy latency path (eval, no autograd, batch 1): successive calls with different inputs, hence
    different mixed kernels, each equal the per-sample reference, through two layers of different shapes."""
    first = make_layer(mask=mask).eval()
    second = DynamicConv2d(12, 5, 3, padding=1).double().eval()
    with torch.no_grad():
        for scale in (1.0, -2.0, 0.5):
            x = scale * torch.randn(1, 8, 9, 9, dtype=torch.double)
            h = first(x)
            torch.testing.assert_close(h, reference(first, x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(second(h), reference(second, h), rtol=1e-10, atol=1e-10)
