"""The fused C++ per-sample conv (padnet.ops.fused): numbers, autotune candidate, modes, fallback without it.

The kernel is built once per session into the test cache directory (about a
minute of compiler time on an idle 2-core machine).
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from padnet import ops
from padnet.layers import CompactDynamicConv2d, DynamicConv2d
from padnet.ops import autotune, backend_selection, fused
from padnet.ops.geometry import ConvGeometry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setenv("PADNET_FUSED", "1")  # build on first use (the default, auto, only loads a cached build)


@pytest.fixture(scope="module")
def kernel():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PADNET_FUSED", "1")
        module = fused.load_fused()
    assert module is not None, f"the fused kernel did not build: {fused._FAILED}"
    return module


def reference(x, pi, dyn, sta, stride, padding, dilation):
    outs = []
    for b in range(x.shape[0]):
        w = torch.einsum("k,k...->...", pi[b], dyn) + (0 if sta is None else sta)
        outs.append(F.conv2d(x[b : b + 1], w, None, stride, padding, dilation))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cin, cout, kernel_size, stride, padding, dilation, hw", [
    (6, 10, 3, 1, 1, 1, (7, 8)),     # L = 56: register blocks with a remainder, O not a multiple of 16
    (5, 33, 3, 2, 2, 2, (9, 9)),     # strided, dilated; three channel tiles, the last partial
    (8, 16, 1, 1, 0, 1, (4, 4)),     # pointwise, L = 16 exactly
    (4, 7, (3, 2), 1, "same", (1, 2), (5, 6)),
])
@pytest.mark.parametrize("with_static", [True, False])
def test_fused_matches_per_sample_reference(kernel, dtype, cin, cout, kernel_size, stride, padding, dilation, hw,
                                            with_static):
    torch.manual_seed(0)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    x = torch.randn(3, cin, *hw, dtype=dtype)
    pi = torch.softmax(torch.randn(3, 4, dtype=dtype), -1)
    dyn = torch.randn(4, cout, cin, *ks, dtype=dtype)
    sta = torch.randn(cout, cin, *ks, dtype=dtype) if with_static else None
    geom = ConvGeometry(ks, stride, padding, dilation, 1)
    with torch.no_grad():
        y = fused.fused_dynamic_conv2d(x, pi, dyn, sta, geom, padding)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, reference(x, pi, dyn, sta, stride, padding, dilation), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, num_kernels, cin, hw", [
    (40, 4, 40, (4, 4)),   # two sample chunks (32 + 8); C*kh*kw = 360: two column chunks, the last partial
    (3, 9, 8, (5, 5)),     # K = 9: the scalar mixing path
    (2, 1, 30, (3, 7)),    # K = 1; L = 21: a pixel remainder after one vector
    (5, 4, 64, (3, 3)),    # L = 9: one vector and its overlapping tail (AVX2), or the scalar edge path only
                           # (AVX-512, fewer pixels than one vector); 3 column chunks
])
def test_fused_chunking_and_kernel_counts(kernel, dtype, batch, num_kernels, cin, hw):
    torch.manual_seed(1)
    x = torch.randn(batch, cin, *hw, dtype=dtype)
    pi = torch.softmax(torch.randn(batch, num_kernels, dtype=dtype), -1)
    dyn = torch.randn(num_kernels, 35, cin, 3, 3, dtype=dtype)
    sta = torch.randn(35, cin, 3, 3, dtype=dtype)
    geom = ConvGeometry((3, 3), 1, 1, 1, 1)
    with torch.no_grad():
        y = fused.fused_dynamic_conv2d(x, pi, dyn, sta, geom, 1)
    ref = reference(x.double(), pi.double(), dyn.double(), sta.double(), 1, 1, 1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(y.double(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tiles", [
    (1, 1, 64), (5, 3, 64), (32, 32, 128), (64, 8, 128), (33, 2, 256), (1024, 256, 64),
])
@pytest.mark.parametrize("hw", [(4, 4), (9, 9), (8, 16)])  # L = 16, 81 (remainders), 128 (4 x 4 register blocks)
def test_every_tile_shape_gives_the_same_numbers(kernel, dtype, tiles, hw):
    """Rows, samples and column chunk only reorder the work: any of them, on any shape, is the reference."""
    torch.manual_seed(2)
    x = torch.randn(5, 24, *hw, dtype=dtype)  # C*kh*kw = 216: chunks of 64 / 128 / 256 end partial
    pi = torch.softmax(torch.randn(5, 3, dtype=dtype), -1)
    dyn = torch.randn(3, 37, 24, 3, 3, dtype=dtype)
    sta = torch.randn(37, 24, 3, 3, dtype=dtype)
    with torch.no_grad():
        y = fused.fused_dynamic_conv2d(x, pi, dyn, sta, ConvGeometry((3, 3), 1, 1, 1, 1), 1, tiles=tiles)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(y.double(), reference(x.double(), pi.double(), dyn.double(), sta.double(), 1, 1, 1),
                               **tol)


@pytest.mark.parametrize("tiles", [(0, 8, 128), (16, 0, 128), (16, 8, 100), (2000, 8, 128)])
def test_bad_tile_shapes_are_refused(kernel, tiles):
    x, pi, dyn = torch.randn(2, 3, 5, 5), torch.rand(2, 2), torch.randn(2, 4, 3, 3, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match="tiles must be"):
        fused.fused_dynamic_conv2d(x, pi, dyn, None, ConvGeometry((3, 3), 1, 1, 1, 1), 1, tiles=tiles)


@pytest.mark.parametrize("block", [4, 6])
def test_tile_rule_balances_the_threads_and_fits_the_l2_cache(monkeypatch, block):
    monkeypatch.setattr(fused, "_L2_BYTES", 2 << 20)  # the rule's inputs, not this machine's cache (512 KiB on Zen 3)
    monkeypatch.setattr(fused, "register_block_rows", lambda pixels, itemsize: block)  # the library's, per CPU
    if block == 4:
        assert fused.fused_tiles(512, 4608, 16, 32, 4, threads=2) == (76, 8, 128)  # 7 tiles (6 x 76 + 56), 4 groups
        assert fused.fused_tiles(154, 4608, 16, 32, 4, threads=2) == (80, 8, 128)  # two tiles: 80 + 74
    else:
        assert fused.fused_tiles(512, 4608, 16, 32, 4, threads=2) == (78, 8, 128)  # 7 tiles (6 x 78 + 44)
        assert fused.fused_tiles(154, 4608, 16, 32, 4, threads=2) == (78, 8, 128)  # two tiles: 78 + 76
    assert fused.fused_tiles(77, 2304, 64, 32, 4, threads=2) == (77, 8, 128)  # one tile, not 64 + 13
    # batch 1, many pixels: 3 tiles -> 4 for 2 threads; few pixels (deep layers): two register blocks high
    assert fused.fused_tiles(240, 1000, 100, 1, 4, threads=2) == (60, 1, 128)
    assert fused.fused_tiles(240, 1000, 49, 1, 4, threads=2) == (2 * block, 1, 256)
    assert fused.fused_tiles(20, 180, 64, 3, 4, threads=1) == (20, 3, 128)  # never more rows / samples than exist
    monkeypatch.setattr(fused, "_L2_BYTES", 256 << 10)  # a small L2: the chunk halves
    assert fused.fused_tiles(512, 4608, 16, 32, 4, threads=2) == ((76, 8, 64) if block == 4 else (78, 8, 64))
    assert fused.l2_cache_bytes() == 256 << 10
    for out_channels in range(1, 200):  # every tile shape covers the rows with tiles of (nearly) equal height
        rows, samples, _ = fused.fused_tiles(out_channels, 90, 16, 32, 4, threads=2)
        tiles = -(-out_channels // rows)
        assert 1 <= rows <= max(out_channels, block) and samples == 8
        assert rows == out_channels or rows % block == 0  # whole register blocks
        assert out_channels - (tiles - 1) * rows > 0 and rows - (out_channels - (tiles - 1) * rows) < rows // 2 + block


@pytest.mark.parametrize("block", [4, 6, 8])
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("pixels, batch", [(16, 32), (49, 1), (100, 1)])
def test_tile_rule_gives_whole_register_blocks_and_busy_threads(monkeypatch, block, threads, pixels, batch):
    """Tiles are whole register blocks, and where few work items exist their count is a multiple of the
    thread count unless no split into whole blocks of one height gives one."""
    monkeypatch.setattr(fused, "_L2_BYTES", 1 << 20)
    monkeypatch.setattr(fused, "register_block_rows", lambda pixels, itemsize: block)
    for out_channels in range(1, 300):
        rows, samples, _ = fused.fused_tiles(out_channels, 300, pixels, batch, 4, threads=threads)
        tiles = -(-out_channels // rows)
        items = tiles * -(-batch // samples)
        assert rows == out_channels or rows % block == 0
        blocks = -(-out_channels // block)
        balanced = [t for t in range(1, blocks + 1) if -(-blocks // -(-blocks // t)) == t
                    and (t * -(-batch // samples)) % threads == 0]
        if items < 8 * threads and items % threads and balanced:
            assert max(balanced) < tiles, (out_channels, rows, tiles)  # only where none at least this fine


def test_register_block_rows_come_from_the_library(kernel):
    """The tile rule rounds to the height of the GEMM's register block, which the compiled library
    reports for its vector width (6 or 8 rows for two or more vectors of pixels, more for one)."""
    wide = fused.register_block_rows(64, 4)
    assert wide in (4, 6, 8) and kernel.register_block_rows(64, 4) == wide
    assert fused.register_block_rows(1, 4) in (8, 16)  # a single vector of pixels: taller blocks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, kernel_size, stride, padding, dilation", [
    ((2, 3, 4, 4), (3, 3), (1, 1), 1, (1, 1)),           # narrow: the gather path
    ((2, 3, 9, 11), (3, 3), (1, 1), 1, (1, 1)),          # wide: row copies
    ((2, 3, 9, 20), (3, 5), (2, 3), (2, 1), (2, 1)),     # strided, dilated, unequal padding
    ((1, 2, 7, 7), (1, 1), (2, 2), 0, (1, 1)),           # pointwise, strided
    ((2, 4, 6, 6), (2, 2), (1, 1), "same", (1, 1)),      # even kernel: padding on the far sides only
    ((2, 4, 6, 9), (3, 2), (1, 1), "same", (1, 3)),      # "same" with dilation, wide rows
])
def test_native_im2col_equals_the_strided_copy(kernel, monkeypatch, dtype, shape, kernel_size, stride, padding,
                                               dilation):
    from padnet.ops.im2col import im2col, im2col_workspace

    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=dtype)
    geom = ConvGeometry(kernel_size, stride, padding, dilation, 1)
    expected, _ = im2col(x, geom)
    calls = []
    real = kernel.im2col
    monkeypatch.setattr(kernel, "im2col", lambda *a: calls.append(1) or real(*a))
    got = im2col_workspace(x, geom).clone()  # PADNET_FUSED=1 here: the C++ im2col
    assert torch.equal(got, expected) and calls == [1]
    monkeypatch.setenv("PADNET_FUSED", "0")
    assert torch.equal(im2col_workspace(x, geom), expected)  # the strided copy gives the same


@pytest.mark.parametrize("backend", ["bmm", "fused"])
def test_gemm_backends_with_the_native_im2col_match_the_reference(kernel, monkeypatch, backend):
    """The tiled GEMM backend unfolds through the C++ im2col in its forward and its backward (weight gradients)."""
    torch.manual_seed(4)
    x = torch.randn(4, 6, 7, 9, dtype=torch.float64, requires_grad=backend == "bmm")
    pi = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    dyn = torch.randn(3, 5, 6, 3, 3, dtype=torch.float64, requires_grad=backend == "bmm")
    geom = ConvGeometry((3, 3), 2, 1, 1, 1)
    ref = reference(x.detach(), pi, dyn.detach(), None, 2, 1, 1)
    calls = []
    real = kernel.im2col
    monkeypatch.setattr(kernel, "im2col", lambda *a: calls.append(1) or real(*a))
    if backend == "fused":
        with torch.no_grad():
            torch.testing.assert_close(fused.fused_dynamic_conv2d(x, pi, dyn, None, geom, 1), ref)
        assert calls == [1]
        return
    y = ops.dynamic_conv2d(x, pi, dyn, None, stride=2, padding=1, backend="bmm")
    torch.testing.assert_close(y, ref)
    gx, gd = torch.autograd.grad(y.square().sum(), (x, dyn))
    x2, d2 = x.detach().requires_grad_(), dyn.detach().requires_grad_()
    y2 = torch.cat([F.conv2d(x2[b : b + 1], torch.einsum("k,k...->...", pi[b], d2), None, 2, 1) for b in range(4)])
    gx2, gd2 = torch.autograd.grad(y2.square().sum(), (x2, d2))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gd, gd2)
    assert len(calls) >= 2  # forward and the backward's weight gradient unfold through the C++ im2col


def test_native_im2col_refuses_a_wrong_buffer(kernel):
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="out must be"):
        kernel.im2col(x, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, torch.empty(10))
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        kernel.im2col(x, 7, 7, 1, 1, 0, 0, 0, 0, 1, 1, torch.empty(2 * 3 * 49))


def test_bad_fused_mode_fails_on_the_first_batched_call(tuning, monkeypatch):
    """A typo in PADNET_FUSED is reported at once -- also in a training call, where the kernel is never a
    candidate -- instead of surfacing only in a later no-grad call."""
    monkeypatch.setenv("PADNET_FUSED", "of")
    x = torch.randn(3, 4, 5, 5)
    pi = torch.softmax(torch.randn(3, 2), -1)
    dyn = torch.randn(2, 6, 4, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="PADNET_FUSED"):
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)


def test_build_key_covers_cpu_features_and_interpreter(monkeypatch):
    base = fused.build_directory()
    monkeypatch.setattr(fused, "cpu_features", lambda: "sse2")  # same model name, fewer instructions
    assert fused.build_directory() != base
    monkeypatch.undo()
    import sysconfig
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda name: ".cpython-399-x.so" if name == "EXT_SUFFIX" else real(name))
    assert fused.build_directory() != base


def test_auto_mode_uses_the_cached_build_without_compiling(kernel, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiling(*args, **kwargs):
        raise AssertionError("auto mode must not compile")

    monkeypatch.setattr(cpp_extension, "load", no_compiling)
    monkeypatch.setattr(fused, "_MODULE", None)
    monkeypatch.setattr(fused, "_FAILED", None)
    monkeypatch.delenv("PADNET_FUSED")
    assert fused.fused_mode() == "auto" and fused.library_path().is_file()
    module = fused.load_fused()
    assert module is not None and hasattr(module, "fused_dynamic_conv")
    # nothing cached (another extensions directory): auto quietly means "not available"
    monkeypatch.setattr(fused, "_MODULE", None)
    monkeypatch.setenv("PADNET_EXTENSIONS_DIR", str(fused.build_directory().parent / "elsewhere"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.load_fused() is None
    monkeypatch.setenv("PADNET_FUSED", "maybe")
    with pytest.raises(ValueError, match="PADNET_FUSED"):
        fused.fused_mode()


def test_fused_refuses_autograd_and_grouped(kernel):
    x, pi = torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(2, 3), -1)
    dyn = torch.randn(3, 4, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        fused.fused_dynamic_conv2d(x, pi, dyn, None, ConvGeometry((3, 3), 1, 1, 1, 1), 1)
    with pytest.raises(ValueError, match="groups"), torch.no_grad():
        fused.fused_dynamic_conv2d(x, pi, dyn[:, :, :2], None, ConvGeometry((3, 3), 1, 1, 1, 2), 1)
    assert not fused.fused_applicable(x, pi, dyn, None, 1, grad=True)
    assert not fused.fused_applicable(x.half(), pi.half(), dyn.half(), None, 1, grad=False)
    assert fused.fused_applicable(x, pi, dyn.detach(), None, 1, grad=False)


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("PADNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PADNET_AUTOTUNE", "1")
    autotune.set_autotune(None)
    autotune.clear_autotune_cache()
    yield
    autotune.clear_autotune_cache()


def test_autotune_times_the_fused_kernel_for_inference_only(kernel, tuning, monkeypatch):
    calls = []
    real = backend_selection.run_backend
    monkeypatch.setattr(backend_selection, "run_backend", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 12, 3, padding=1).eval()
    compact = CompactDynamicConv2d(layer)
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        ref = reference(x, layer.routing_weights(x), layer.weight_dynamic * layer.scales()[1], None, 1, 1, 1)
        torch.testing.assert_close(compact(x), ref, rtol=1e-4, atol=1e-4)
    assert "fused" in calls and set(calls) <= {*ops.CONCRETE_BACKENDS, "fused"}
    calls.clear()
    compact(x).sum().backward()  # training: the kernel has no backward, so it is not a candidate
    assert calls and "fused" not in calls


@pytest.mark.parametrize("forced", ["fused", "weight", "bmm"])
@pytest.mark.parametrize("compact", [False, True])
def test_batch_one_inference_runs_the_tuned_backend_with_the_same_numbers(kernel, tuning, monkeypatch, forced,
                                                                          compact):
    """Batch 1 times "weight" (aggregate + plain conv), the fused kernel and the tiled per-sample GEMM once
    per input shape; each gives the per-sample reference, bias included, and the layer keeps the choice
    until the shape changes."""
    tuned = []

    def fake_tune(key, candidates, run, device, budget_s=None):
        for name in candidates:
            run(name)  # every candidate runs on the real factors
        tuned.append(tuple(candidates))
        return forced

    monkeypatch.setattr(autotune, "tune", fake_tune)
    torch.manual_seed(5)
    layer = DynamicConv2d(6, 10, 3, padding=1, bias=True).eval()
    model = CompactDynamicConv2d(layer) if compact else layer
    literal = copy.deepcopy(layer)
    literal.backend = "weight"  # an explicit backend: the literal formula, no batch-1 shortcut
    x = torch.randn(1, 6, 7, 9)
    with torch.no_grad():
        expected = literal(x)
        first = model(x)
        second = model(x)
    assert tuned == [("weight", "fused", "bmm")]  # once: the second call found the layer's choice
    assert model.__dict__["_single_sample_choice"][1][0] == forced
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with torch.no_grad():
        model(torch.randn(1, 6, 5, 5))  # a new shape is decided again
    assert tuned == [("weight", "fused", "bmm")] * 2


def test_a_rebuilt_kernel_is_tuned_again(kernel, tuning, monkeypatch):
    """Choices timed against one build of the kernel do not carry over to another (its tag is in the key)."""
    tuned = []
    real_tune = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda key, *a, **k: tuned.append(key) or real_tune(key, *a, **k))
    layer = DynamicConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        layer(x)
        backend_selection.clear_choices()
        layer(x)  # the same build: the cached choice
        assert len(tuned) == 1 and tuned[0][-1] == f"fused:{fused.kernel_tag()}"
        monkeypatch.setattr(fused, "kernel_tag", lambda: "another-build")
        backend_selection.clear_choices()
        layer(x)
    assert len(tuned) == 2 and tuned[1][-1] == "fused:another-build"


def test_batch_one_without_tuning_uses_the_rule(kernel, monkeypatch):
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    autotune.set_autotune(None)
    layer = DynamicConv2d(4, 4, 3, padding=1).eval()
    with torch.no_grad():
        layer(torch.randn(1, 4, 6, 6))
    assert layer.__dict__["_single_sample_choice"][1][0] == "weight"


def test_single_sample_conv_refuses_an_unknown_backend():
    x, pi, dyn = torch.randn(1, 2, 4, 4), torch.ones(1, 2) / 2, torch.randn(2, 3, 2, 3, 3)
    with pytest.raises(ValueError, match="'weight', 'fused' or 'bmm'"):
        ops.dynamic_conv.single_sample_conv(x, pi, dyn, None, None, None, 1, 1, 1, 1, "output")


def test_a_kernel_that_becomes_available_is_tuned_then(kernel, tuning, monkeypatch):
    """The candidate set is part of the tuning key: a winner tuned without the kernel does not shadow it later."""
    trials = []
    real = backend_selection.run_backend
    monkeypatch.setattr(backend_selection, "run_backend",
                        lambda name, *a, **k: trials.append(name) or real(name, *a, **k))
    x = torch.randn(4, 6, 5, 5)
    pi = torch.softmax(torch.randn(4, 3), -1)
    dyn = torch.randn(3, 8, 6, 3, 3)
    monkeypatch.setenv("PADNET_FUSED", "0")
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert trials and "fused" not in trials
    trials.clear()
    backend_selection.clear_choices()
    monkeypatch.setenv("PADNET_FUSED", "1")
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert "fused" in trials  # tuned again, now with the kernel
    assert len(ops.autotune_cache()) == 2


def test_fused_is_timed_right_after_the_rule(kernel, tuning, monkeypatch):
    """The tuning budget (0.5 s) can run out before the last candidates: the kernel must not be one of them.
    It is first where the rule picks it (thin layers: 16 output pixels or fewer), else right after the rule."""
    seen = []
    real = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda key, cands, *a, **k: seen.append(list(cands)) or real(key, cands, *a, **k))
    with torch.no_grad():
        for size in (4, 6):  # 16 and 36 output pixels
            ops.dynamic_conv2d(torch.randn(3, 6, size, size), torch.softmax(torch.randn(3, 2), -1),
                               torch.randn(2, 8, 6, 3, 3), None, padding=1)
    assert len(seen) == 2 and seen[0][0] == "fused" and seen[1][1] == "fused"
    assert all(sorted(c) == sorted({*ops.CONCRETE_BACKENDS, "fused"}) for c in seen)  # each candidate once


def test_rule_without_tuning_runs_thin_inference_layers_on_the_kernel(kernel, monkeypatch):
    """Tuning off: a batched inference call with at most 16 output pixels runs the fused kernel (the rule),
    with autograd or without the library the tiled GEMM; the numbers are the reference's either way."""
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    autotune.set_autotune(None)
    backend_selection.clear_choices()
    torch.manual_seed(2)
    x, pi, dyn = torch.randn(3, 6, 4, 4), torch.softmax(torch.randn(3, 2), -1), torch.randn(2, 8, 6, 3, 3)
    with torch.no_grad():
        assert backend_selection.resolve_backend(x, pi, dyn, None, 1, 1, 1, 1) == "fused"
        y = ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
        expected = ops.dynamic_conv2d(x, pi, dyn, None, padding=1, backend="weight")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert backend_selection.resolve_backend(x, pi, dyn.requires_grad_(), None, 1, 1, 1, 1) == "bmm"
    monkeypatch.setenv("PADNET_FUSED", "0")
    with torch.no_grad():
        assert backend_selection.resolve_backend(x, pi, dyn.detach(), None, 1, 1, 1, 1) == "bmm"


def test_the_library_becoming_available_makes_kept_decisions_again(kernel, monkeypatch):
    """Choices kept while the library was absent (the rule's "bmm" for a thin layer, with tuning off) are made
    again once it loads: loading bumps the autotune generation, and the rule then picks the fused kernel."""
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    monkeypatch.setenv("PADNET_FUSED", "auto")
    autotune.set_autotune(None)
    backend_selection.clear_choices()
    x, pi, dyn = torch.randn(3, 6, 4, 4), torch.softmax(torch.randn(3, 2), -1), torch.randn(2, 8, 6, 3, 3)
    monkeypatch.setattr(fused, "_MODULE", None)
    monkeypatch.setattr(fused, "_ABSENT_AT", None)
    monkeypatch.setattr(fused, "_import_prebuilt", lambda: None)  # not built yet
    with torch.no_grad():
        assert backend_selection.resolve_backend(x, pi, dyn, None, 1, 1, 1, 1) == "bmm"
    monkeypatch.setattr(fused, "_ABSENT_AT", None)
    monkeypatch.setattr(fused, "_import_prebuilt", lambda: kernel)  # built now (e.g. by another process)
    before = autotune.generation()
    assert fused.load_fused() is kernel and autotune.generation() > before
    with torch.no_grad():
        assert backend_selection.resolve_backend(x, pi, dyn, None, 1, 1, 1, 1) == "fused"


def test_without_the_kernel_the_pure_pytorch_backends_serve(tuning, monkeypatch):
    monkeypatch.setattr(fused, "_MODULE", None)
    monkeypatch.setattr(fused, "_FAILED", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x = torch.randn(4, 4, 6, 6, dtype=torch.double)
    pi = torch.softmax(torch.randn(4, 3, dtype=torch.double), -1)
    dyn = torch.randn(3, 5, 4, 3, 3, dtype=torch.double)
    with pytest.warns(RuntimeWarning, match="could not be built"), torch.no_grad():
        y = ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    torch.testing.assert_close(y, reference(x, pi, dyn, None, 1, 1, 1))
    assert fused.load_fused() is None  # not retried
    assert set(ops.autotune_cache().values()) <= set(ops.CONCRETE_BACKENDS)
    monkeypatch.setattr(fused, "_FAILED", None)
    monkeypatch.setenv("PADNET_FUSED", "0")
    assert fused.load_fused() is None and not fused.fused_enabled()
    monkeypatch.delenv("PADNET_FUSED")
    assert fused.fused_enabled() and fused.fused_mode() == "auto"  # default: a cached build only


# ---- the element-PAD folding kernels (training): padnet.ops.masked_factors' one-pass path ----

def literal_folding(dyn, sta, mask, ls, ld):
    """F'[k] = ld M W_k + ls (1 - M) W_s and dL/d(W_k, W_s, ls, ld) for L = <G, F'> by plain autograd (float64)."""
    dyn, sta = dyn.double().requires_grad_(), sta.double().requires_grad_()
    ls, ld = ls.double().requires_grad_(), ld.double().requires_grad_()
    m = mask.double()
    return dyn, sta, ls, ld, ld * m * dyn + ls * (1 - m) * sta


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_kernels, shape", [
    (4, (7, 5, 3, 3)),       # 315 entries: less than one block, a vector tail
    (3, (40, 33, 3, 2)),     # 7,920 entries: four blocks, the last partial
    (1, (3,)),               # fewer entries than one vector: the scalar tail only
    (5, (16, 16, 1, 1)),     # whole vectors, K = 5
])
@pytest.mark.parametrize("need", [(True, True, True, True), (True, False, True, False),
                                  (False, True, False, True), (False, False, True, True)])
def test_folding_kernels_match_the_literal_formula(kernel, monkeypatch, dtype, num_kernels, shape, need):
    from padnet.ops import masked_factors as mf

    torch.manual_seed(2)
    dyn, sta = torch.randn(num_kernels, *shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    mask = (torch.rand(*shape) < 0.4).to(dtype)
    ls, ld = torch.tensor(0.7, dtype=dtype), torch.tensor(1.3, dtype=dtype)
    g = torch.randn(num_kernels, *shape, dtype=dtype)
    assert mf._compiled_folding(dyn, sta, mask) is not None  # the kernel serves these tensors
    folded = mf.folded_factors(dyn, sta, mask, ls, ld).clone()
    need_d, need_s, need_ls, need_ld = need
    grads = mf.folded_factor_grads(g.clone(), dyn, sta, mask, ls, ld, need_d, need_s, need_ls, need_ld)

    d64, s64, ls64, ld64, ref = literal_folding(dyn, sta, mask, ls, ld)
    ref_grads = torch.autograd.grad(ref, (d64, s64, ls64, ld64), g.double())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.double(), ref.detach(), **tol)
    for got, want, needed in zip(grads, ref_grads, need):
        if not needed:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == want.shape
        # the scale gradients are sums over every entry: relative to their size
        scale = max(1.0, float(want.abs().max())) if want.dim() == 0 else 1.0
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)


def test_folding_kernels_agree_with_the_aten_path_and_are_thread_count_independent(kernel, monkeypatch,
                                                                                      at_one_and_two_threads):
    from padnet.ops import masked_factors as mf

    torch.manual_seed(3)
    dyn, sta = torch.randn(4, 64, 32, 3, 3), torch.randn(64, 32, 3, 3)  # 18,432 entries: nine blocks
    mask = (torch.rand(64, 32, 3, 3) < 0.3).float()
    ls, ld = torch.tensor(0.9), torch.tensor(1.1)
    g = torch.randn(4, 64, 32, 3, 3)

    def both():
        return (mf.folded_factors(dyn, sta, mask, ls, ld).clone(),
                mf.folded_factor_grads(g.clone(), dyn, sta, mask, ls, ld, True, True, True, True))

    compiled = both()
    monkeypatch.setenv("PADNET_FUSED", "0")
    assert mf._compiled_folding(dyn, sta, mask) is None
    aten = both()
    torch.testing.assert_close(compiled[0], aten[0], rtol=1e-6, atol=1e-6)  # same per-entry formula
    for a, b in zip(compiled[1], aten[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("PADNET_FUSED", "1")
    one, two = at_one_and_two_threads(both)
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=0)
    for a, b in zip(two[1], one[1]):  # fixed blocks, summed in block order: bit for bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_folding_falls_back_where_the_kernel_cannot_serve(kernel):
    from padnet.ops import masked_factors as mf

    dyn, sta, mask = torch.randn(2, 4, 3), torch.randn(4, 3), torch.ones(4, 3)
    assert mf._compiled_folding(dyn, sta, mask) is not None
    assert mf._compiled_folding(dyn.bfloat16(), sta.bfloat16(), mask) is None
    assert mf._compiled_folding(dyn, sta.double(), mask) is None
    assert mf._compiled_folding(dyn.transpose(1, 2), sta.t(), mask) is None  # not contiguous
    ls, ld = torch.tensor(1.0), torch.tensor(1.0)
    ref = ld * mask.t() * dyn.transpose(1, 2) + ls * (1 - mask.t()) * sta.t()
    torch.testing.assert_close(mf.folded_factors(dyn.transpose(1, 2), sta.t(), mask.t(), ls, ld), ref)
    # the kernel itself refuses what its wrapper would never pass, with the reason
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel.fold_factors(dyn.view(2, -1), sta.double().view(-1), mask.view(-1), 1.0, 1.0, dyn.view(2, -1).clone())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernel.fold_factor_grads(dyn.view(2, -1).clone(), dyn.view(2, -1), sta.view(-1)[:5], mask.view(-1),
                                 1.0, 1.0, True, True)


@pytest.mark.parametrize("backend_batch", [1, 6])  # batch 1: the "weight" path; batch 6 here: "bmm" (rule)
def test_element_training_step_with_the_folding_kernels_equals_the_literal_formula(kernel, monkeypatch,
                                                                                    backend_batch):
    from padnet.ops.masked_conv import masked_dynamic_conv2d

    torch.manual_seed(4)
    dtype = torch.float64
    x = torch.randn(backend_batch, 6, 5, 5, dtype=dtype, requires_grad=True)
    logits = torch.randn(backend_batch, 3, dtype=dtype, requires_grad=True)
    dyn = torch.randn(3, 8, 6, 3, 3, dtype=dtype, requires_grad=True)
    sta = torch.randn(8, 6, 3, 3, dtype=dtype, requires_grad=True)
    mask = (torch.rand(8, 6, 3, 3) < 0.3).to(dtype)
    ls = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    ld = torch.tensor(1.2, dtype=dtype, requires_grad=True)
    leaves = (x, logits, dyn, sta, ls, ld)
    gy = torch.randn(backend_batch, 8, 5, 5, dtype=dtype)

    pi = torch.softmax(logits, -1)
    y = masked_dynamic_conv2d(x, pi, dyn, sta, mask, ls, ld, padding=1, routing_sums_to_one=True)
    got = torch.autograd.grad(y, leaves, gy)
    pi = torch.softmax(logits, -1)
    kernels = torch.einsum("bk,k...->b...", pi, ld * mask * dyn) + ls * (1 - mask) * sta
    ref = torch.cat([F.conv2d(x[b:b + 1], kernels[b], None, 1, 1) for b in range(backend_batch)])
    want = torch.autograd.grad(ref, leaves, gy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_folding_kernels_record_their_writes_and_keep_the_scales_shapes(kernel):
    from padnet.ops import masked_factors as mf

    torch.manual_seed(5)
    dyn, sta = torch.randn(3, 6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    mask = (torch.rand(6, 4, 3, 3) < 0.5).float()
    g = torch.randn(3, 6, 4, 3, 3)
    version = g._version
    ls, ld = torch.tensor([0.5]), torch.tensor([2.0])  # 1-element scales: their gradients keep that shape
    g_d, g_s, g_ls, g_ld = mf.folded_factor_grads(g, dyn, sta, mask, ls, ld, True, True, True, True)
    assert g._version > version  # written in place, and autograd can tell
    assert g_ls.shape == ls.shape and g_ld.shape == ld.shape
    g_ls0, g_ld0 = mf.folded_factor_grads(g.clone(), dyn, sta, mask, ls[0], ld[0], False, False, True, True)[2:]
    assert g_ls0.shape == () and g_ld0.shape == ()
    # a broadcast mask is the aten path's business: the kernel is not asked
    narrow = torch.ones(6, 1, 1, 1)
    assert mf._compiled_folding(dyn, sta, narrow) is None
    torch.testing.assert_close(mf.folded_factors(dyn, sta, narrow, ls, ld), ld * dyn + 0 * sta)


def test_build_entry_point_reports_and_runs_without_a_double_import(monkeypatch, capsys):
    import subprocess
    import sys

    from padnet.ops import build_fused

    monkeypatch.setattr(build_fused, "build_fused", lambda verbose=False: None)
    monkeypatch.setattr(build_fused, "library_path", lambda: "/cache/lib.so")
    assert build_fused.main([]) == 0 and "built: /cache/lib.so" in capsys.readouterr().out

    def no_compiler(verbose=False):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(build_fused, "build_fused", no_compiler)
    assert build_fused.main([]) == 1
    err = capsys.readouterr().err
    assert "not built (RuntimeError: no C++ compiler found)" in err and "second line" not in err
    with pytest.raises(SystemExit):
        build_fused.main(["--bogus"])
    # as a module: ``padnet.ops`` imports ``.fused``, so the entry point must be a module nothing imports
    # (runpy warns when it runs a module that is already in sys.modules); --help builds nothing
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "padnet.ops.build_fused", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: python -m padnet.ops.build_fused" in run.stdout, run.stderr
    assert "RuntimeWarning" not in run.stderr


def test_functional_batch_one_auto_uses_the_tuned_choice(kernel, tuning, monkeypatch):
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None: "fused")
    calls = []
    real = fused.fused_dynamic_conv2d
    monkeypatch.setattr(fused, "fused_dynamic_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(8)
    x, pi = torch.randn(1, 5, 7, 7, dtype=torch.float64), torch.softmax(torch.randn(1, 3, dtype=torch.float64), -1)
    dyn, sta = torch.randn(3, 6, 5, 3, 3, dtype=torch.float64), torch.randn(6, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        y = ops.dynamic_conv2d(x, pi, dyn, sta, padding=1)
        explicit = ops.dynamic_conv2d(x, pi, dyn, sta, padding=1, backend="weight")  # never tuned
    assert calls == [1]
    torch.testing.assert_close(y, reference(x, pi, dyn, sta, 1, 1, 1))
    torch.testing.assert_close(explicit, y)


@pytest.mark.parametrize("batch", [1, 4])
def test_turning_the_kernel_off_after_it_was_chosen_falls_back(kernel, tuning, monkeypatch, batch):
    """PADNET_FUSED=0 after the tuner chose the fused kernel: the next call decides again, without it."""
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        "fused" if "fused" in candidates else candidates[0])
    layer = DynamicConv2d(6, 8, 3, padding=1).eval()
    x = torch.randn(batch, 6, 5, 5)
    with torch.no_grad():
        on = layer(x)
        monkeypatch.setenv("PADNET_FUSED", "0")
        off = layer(x)  # used to raise "kernel is unavailable"
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forced", ["fused", "bmm"])
def test_batch_one_fused_keeps_channels_last(kernel, tuning, monkeypatch, forced):
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None: forced)
    layer = DynamicConv2d(6, 8, 3, padding=1).eval()
    x = torch.randn(1, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
        expected = layer(x.contiguous())
    assert layer.__dict__["_single_sample_choice"][1][0] == forced
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)


# ---- the compiled one-call batch-1 forward (routing + mixing + plain conv) ------------------------------

def spy_routed(monkeypatch):
    """Count calls of the compiled batch-1 forward the layers are handed."""
    from padnet.layers import dynamic_conv as layer_module

    calls = []
    real = layer_module.routed_call

    def spying(*args, **kwargs):
        found = real(*args, **kwargs)
        if found is None:
            return None
        fn, tail = found
        return (lambda *a: calls.append(1) or fn(*a)), tail

    monkeypatch.setattr(layer_module, "routed_call", spying)
    return calls


def route_like_the_compiled_call(monkeypatch, kernel, model):
    """Make the Python path of ``model`` route with the compiled call's hand-written router (``route_one``), so
    that what follows the routing -- mixing, conv, bias, layout -- can be compared to the bit."""
    layer = model

    def compiled_route(x):
        return kernel.route_one(x, *layer.attention.routing_tensors(), layer.temperature, layer.routing != "softmax")

    monkeypatch.setattr(model, "_route", compiled_route, raising=False)


def python_routing(attention, x, routing="softmax", temperature=1.0):
    from padnet.layers.dynamic_conv import routing_from_logits

    return routing_from_logits(attention(x), routing, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["none", "batch", "batch, no affine"])
@pytest.mark.parametrize("routing, temperature", [("softmax", 1.0), ("softmax", 0.3), ("sigmoid", 2.5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_router_matches_the_module(kernel, dtype, norm, routing, temperature, layout):
    """``route_one`` (the compiled calls' hand-written router: pool, Linear, BatchNorm with running statistics,
    ReLU, Linear, softmax / sigmoid of logits / T) equals ``KernelAttention`` + ``routing_from_logits`` to
    float rounding, for channel counts that are and are not whole vectors and pixel counts below a vector."""
    from padnet.layers.dynamic_conv import KernelAttention

    torch.manual_seed(11)
    for channels, h, w in [(5, 3, 7), (16, 1, 1), (37, 9, 10), (64, 8, 8), (9, 60, 70)]:
        attention = KernelAttention(channels, 6, 4, norm="none" if norm == "none" else "batch").to(dtype).eval()
        with torch.no_grad():
            attention.fc1.bias.uniform_(-1, 1)
            attention.fc2.bias.uniform_(-1, 1)
            if attention.norm is not None:
                attention.norm.running_mean.uniform_(-1, 1)
                attention.norm.running_var.uniform_(0.5, 2)
                attention.norm.weight.uniform_(0.5, 2)
                attention.norm.bias.uniform_(-1, 1)
        if norm == "batch, no affine":
            attention.norm.weight = None
            attention.norm.bias = None
        x = torch.randn(1, channels, h, w, dtype=dtype) * 3 + 0.5
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert kernel.route_one_hand_written(x, *attention.routing_tensors())
            expected = python_routing(attention, x, routing, temperature)
            got = kernel.route_one(x, *attention.routing_tensors(), temperature, routing == "sigmoid")
        assert got.shape == expected.shape == (1, 6) and got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_compiled_router_takes_the_aten_ops_where_it_cannot_serve(kernel):
    """A non-contiguous router weight, autograd on, or an input neither contiguous nor channels_last: the
    Python router's ATen ops in its order (equal to the bit, and with a graph under autograd); NaN input gives
    NaN routing weights on either path; a wrong weight shape is ATen's error."""
    from padnet.layers.dynamic_conv import KernelAttention

    torch.manual_seed(12)
    attention = KernelAttention(12, 4, 2).eval()
    x = torch.randn(1, 12, 5, 6)
    parts = list(attention.routing_tensors())
    with torch.no_grad():
        expected = python_routing(attention, x)
        strided = list(parts)
        strided[0] = parts[0].t().contiguous().t()
        assert kernel.route_one_hand_written(x, *parts) and not kernel.route_one_hand_written(x, *strided)
        assert torch.equal(kernel.route_one(x, *strided, 1.0, False), expected)
        sliced = torch.randn(1, 12, 5, 12)[..., ::2]
        assert not kernel.route_one_hand_written(sliced, *parts)
        assert torch.equal(kernel.route_one(sliced, *parts, 1.0, False), python_routing(attention, sliced))
        for bad in (x.clone(), x.contiguous(memory_format=torch.channels_last).clone()):
            bad[0, 3, 1, 2] = float("nan")
            assert torch.isnan(kernel.route_one(bad, *parts, 1.0, False)).all()
        with pytest.raises(RuntimeError):
            wrong = list(parts)
            wrong[0] = torch.randn(parts[0].shape[0], 11)
            kernel.route_one(x, *wrong, 1.0, False)
        with pytest.raises(RuntimeError, match="temperature"):
            kernel.route_one(x, *parts, 0.0, False)
        uniform = kernel.route_one(x, *parts, float("inf"), False)  # as the Python path: logits / inf = 0
        assert torch.equal(uniform, python_routing(attention, x, temperature=float("inf")))
    assert not kernel.route_one_hand_written(x, *parts)  # autograd on: the ATen ops, differentiable
    graph = kernel.route_one(x, *parts, 1.0, False)
    assert torch.equal(graph, expected) and graph.requires_grad

ROUTED_CASES = {
    "plain": dict(cin=6, cout=10, kwargs={}),
    "bias, sigmoid, temperature": dict(cin=6, cout=10, kwargs=dict(bias=True, routing="sigmoid", temperature=3.0)),
    "router batch norm": dict(cin=8, cout=8, kwargs=dict(bias=True, router_norm="batch", temperature=0.5)),
    "strided, dilated, grouped": dict(cin=8, cout=12, kwargs=dict(stride=2, dilation=2, groups=4, bias=True)),
    "depthwise": dict(cin=8, cout=8, kwargs=dict(groups=8)),
    "element PAD": dict(cin=6, cout=10, kwargs=dict(bias=True), element=True),
}


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(ROUTED_CASES))
def test_batch_one_compiled_call_equals_the_python_path(kernel, monkeypatch, case, dtype, compact):
    """The compiled call equals the Python path to float rounding (its router is hand-written), and to the bit
    given the same routing weights (the same ATen ops for mixing and conv), and both equal the literal
    per-sample formula; channels_last input included."""
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")  # the rule's "weight" for both paths (no timing)
    autotune.set_autotune(None)
    spec = ROUTED_CASES[case]
    torch.manual_seed(3)
    layer = DynamicConv2d(spec["cin"], spec["cout"], 3, padding=2, **spec["kwargs"]).to(dtype)
    if spec.get("element"):
        layer.set_mode_mask("weight", (torch.rand(layer.mode_mask.shape) < 0.3).to(dtype))
    with torch.no_grad():
        layer.scale.phi.fill_(0.3) if getattr(layer.scale, "phi", None) is not None else None
        if layer.attention.norm is not None:  # non-trivial running statistics
            layer.attention.norm.running_mean.uniform_(-1, 1)
            layer.attention.norm.running_var.uniform_(0.5, 2)
    layer.eval()
    literal = copy.deepcopy(layer)
    literal.backend = "weight"  # explicit backend: the literal formula
    model = CompactDynamicConv2d(layer) if compact else layer
    x = torch.randn(1, spec["cin"], 9, 10, dtype=dtype)
    calls = spy_routed(monkeypatch)
    with torch.no_grad():
        compiled = model(x)
        compiled_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) == 2
    monkeypatch.undo()
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    monkeypatch.setenv("PADNET_FUSED", "0")  # the Python path
    with torch.no_grad():
        python = model(x)
        python_cl = model(x.contiguous(memory_format=torch.channels_last))
        expected = literal(x)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(compiled, python, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled_cl, python_cl, rtol=tol, atol=tol)
    route_like_the_compiled_call(monkeypatch, kernel, model)
    with torch.no_grad():
        same_pi, same_pi_cl = model(x), model(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(compiled, same_pi) and torch.equal(compiled_cl, same_pi_cl)
    assert compiled_cl.is_contiguous(memory_format=torch.channels_last) == python_cl.is_contiguous(
        memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(compiled, expected, rtol=tol, atol=tol)


def test_batch_one_compiled_call_is_skipped_where_python_must_run(kernel, monkeypatch):
    """Forward hooks on the router or its parts, a replaced or subclassed router part, string padding, a norm
    without running statistics, autograd and training: the Python path, with the hook's effect."""
    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    autotune.set_autotune(None)
    torch.manual_seed(0)
    x = torch.randn(1, 6, 7, 7)

    def fresh(padding=1, **kwargs):
        return DynamicConv2d(6, 8, 3, padding=padding, **kwargs).eval()

    calls = spy_routed(monkeypatch)
    layer = fresh()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1  # the default: compiled
    # a forward hook on the router doubles its logits: the output must change, so Python runs the module
    for target in ("attention", "attention.fc1", "attention.fc2"):
        layer = fresh()
        with torch.no_grad():
            plain = layer(x)
        n = len(calls)
        handle = layer.get_submodule(target).register_forward_hook(lambda m, i, o: o * 2)
        with torch.no_grad():
            hooked = layer(x)
        assert len(calls) == n and not torch.equal(hooked, plain), target
        handle.remove()
        with torch.no_grad():
            assert torch.equal(layer(x), plain)  # hook removed: compiled again, same numbers
        assert len(calls) == n + 1
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        layer = fresh()
        n = len(calls)
        with torch.no_grad():
            layer(x)
        assert len(calls) == n and "KernelAttention" in seen  # a global hook sees the router
    finally:
        handle.remove()

    class ScaledLinear(torch.nn.Linear):
        def forward(self, inp):
            return super().forward(inp) * 2

    layer = fresh()
    old = layer.attention.fc2
    layer.attention.fc2 = ScaledLinear(old.in_features, old.out_features)
    n = len(calls)
    with torch.no_grad():
        layer(x)
    assert len(calls) == n
    layer = fresh(padding="same")
    with torch.no_grad():
        layer(x)
    assert len(calls) == n
    layer = fresh(router_norm="batch")
    layer.attention.norm.running_mean = None
    layer.attention.norm.running_var = None
    layer.attention.norm.track_running_stats = False
    assert layer.attention.routing_tensors() is None
    with torch.no_grad(), pytest.raises(ValueError, match="more than 1 value"):
        layer(x)  # batch statistics of one sample: the Python path's own error, not a compiled result
    layer = fresh()
    layer(x)  # autograd
    layer.train()
    with torch.no_grad():
        layer(x)  # training mode
    assert len(calls) == n


def test_a_layer_that_ran_the_compiled_call_pickles_and_copies(kernel, monkeypatch):
    """The batch-1 decision (holding the compiled function) is per process: not pickled, not deep-copied."""
    import io
    import pickle

    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    autotune.set_autotune(None)
    layer = DynamicConv2d(6, 8, 3, padding=1).eval()
    model = torch.nn.Sequential(layer, CompactDynamicConv2d(copy.deepcopy(layer)))
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        expected = layer(x), model[1](x)
    assert "_single_sample_choice" in layer.__dict__
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert "_single_sample_choice" not in clone[0].__dict__
        with torch.no_grad():
            assert torch.equal(clone[0](x), expected[0]) and torch.equal(clone[1](x), expected[1])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False), torch.nn.Sequential)


def test_batch_one_compiled_call_leaves_custom_routing_to_python(kernel, monkeypatch):
    """A router replaced by another module, a forward patched on an instance, tensor-subclass weights, an
    active TorchFunctionMode, a subclass overriding the routing: the Python path runs and its result is kept."""
    from torch.overrides import TorchFunctionMode

    monkeypatch.setenv("PADNET_AUTOTUNE", "0")
    autotune.set_autotune(None)
    torch.manual_seed(1)
    x = torch.randn(1, 6, 7, 7) + torch.randn(1, 6, 1, 1)
    calls = spy_routed(monkeypatch)

    def fresh(cls=DynamicConv2d):
        layer = cls(6, 8, 3, padding=1).eval()
        with torch.no_grad():
            layer.attention.fc1.bias.fill_(2.0)  # active hidden units: routing away from uniform
            assert torch.softmax(layer.attention(x), -1).std() > 0.01
        return layer

    class LogitRouter(torch.nn.Module):  # any module giving [B, K] logits
        def forward(self, inp):
            return inp.mean(dim=(2, 3))[:, :4] * 3

    layer = fresh()
    layer.attention = LogitRouter()
    with torch.no_grad():
        y = layer(x)
    pi = torch.softmax(x.mean(dim=(2, 3))[:, :4] * 3, -1)
    expected = F.conv2d(x, torch.einsum("k,k...->...", pi[0], layer.weight_dynamic * layer.scales()[1]), None, 1, 1)
    torch.testing.assert_close(y, expected)
    assert calls == []

    layer = fresh()
    with torch.no_grad():
        plain = layer(x)
    assert len(calls) == 1
    fc2 = layer.attention.fc2
    fc2.forward = lambda inp: torch.nn.Linear.forward(fc2, inp) * 0  # patched on the instance: uniform routing
    with torch.no_grad():
        patched = layer(x)
    assert len(calls) == 1 and not torch.equal(patched, plain)

    seen = []

    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    layer = fresh()
    layer.attention.fc1.weight = torch.nn.Parameter(layer.attention.fc1.weight.detach().as_subclass(Tagged))
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1 and seen  # the subclass saw the Python path's ops

    class Counting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    layer = fresh()
    seen.clear()
    with torch.no_grad(), Counting():
        layer(x)
    assert len(calls) == 1 and seen

    class Sharper(DynamicConv2d):  # a subclass that routes its own way
        def _route(self, inp):
            return torch.softmax(self.attention(inp) * 10, -1)

    layer = fresh(Sharper)
    with torch.no_grad():
        sharp = layer(x)
        reference_sharp = single_route(layer, x, layer._route(x))
    torch.testing.assert_close(sharp, reference_sharp)
    assert len(calls) == 1


def single_route(layer, x, pi):
    dyn, sta, bias_dyn, bias_sta = layer.combined_factors()
    return ops.dynamic_conv2d(x, pi, dyn, sta, bias_dyn, bias_sta, layer.stride, layer.padding, layer.dilation,
                              layer.groups, "weight")


FUSED_ROUTED_CASES = {
    "plain": dict(cin=6, cout=10, k=3, kwargs=dict(padding=1)),
    "bias, sigmoid, temperature": dict(cin=6, cout=10, k=3, kwargs=dict(padding=1, bias=True, routing="sigmoid",
                                                                        temperature=3.0)),
    "router batch norm": dict(cin=8, cout=8, k=3, kwargs=dict(padding=1, bias=True, router_norm="batch")),
    "element PAD": dict(cin=6, cout=10, k=3, kwargs=dict(padding=1, bias=True), element=True),
    "pointwise": dict(cin=8, cout=12, k=1, kwargs=dict()),
    "strided": dict(cin=5, cout=7, k=3, kwargs=dict(stride=2, padding=1)),
    "same padding, dilated": dict(cin=5, cout=7, k=3, kwargs=dict(padding="same", dilation=2)),
}


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(FUSED_ROUTED_CASES))
@pytest.mark.parametrize("backend", ["fused", "bmm"])
def test_batch_one_compiled_fused_call_equals_the_python_path(kernel, tuning, monkeypatch, case, dtype, compact,
                                                              backend):
    """Where the batch-1 choice is the fused kernel or the per-sample GEMM (``bmm``), the compiled call
    (router, im2col, the kernel, bias, channels_last) equals the Python path with the same backend to float
    rounding, to the bit given the same routing weights, and the literal formula. The "element PAD" and sigmoid cases have a static part (``bmm`` mixes
    with addmm there), the others none (``bmm`` mixes with the compiled ``mix_factors``)."""
    from padnet.layers import dynamic_conv as layer_module

    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        backend if backend in candidates else candidates[0])
    spec = FUSED_ROUTED_CASES[case]
    torch.manual_seed(4)
    layer = DynamicConv2d(spec["cin"], spec["cout"], spec["k"], **spec["kwargs"]).to(dtype)
    if spec.get("element"):
        layer.set_mode_mask("weight", (torch.rand(layer.mode_mask.shape) < 0.3).to(dtype))
    with torch.no_grad():
        layer.attention.fc1.bias.fill_(1.0)  # routing away from uniform
        if layer.attention.norm is not None:
            layer.attention.norm.running_mean.uniform_(-1, 1)
            layer.attention.norm.running_var.uniform_(0.5, 2)
    layer.eval()
    literal = copy.deepcopy(layer)
    literal.backend = "weight"
    model = CompactDynamicConv2d(layer) if compact else layer
    x = torch.randn(1, spec["cin"], 9, 11, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls = spy_routed(monkeypatch)
    with torch.no_grad():
        compiled, compiled_cl = model(x), model(x_cl)
    assert model.__dict__["_single_sample_choice"][1][0] == backend and len(calls) == 2
    monkeypatch.setattr(layer_module, "routed_call", lambda *args, **kwargs: None)
    model.__dict__.pop("_single_sample_choice")
    with torch.no_grad():
        python, python_cl = model(x), model(x_cl)
        expected = literal(x)
    assert model.__dict__["_single_sample_choice"][1] == (backend, None)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(compiled, python, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled_cl, python_cl, rtol=tol, atol=tol)
    route_like_the_compiled_call(monkeypatch, kernel, model)
    with torch.no_grad():
        same_pi, same_pi_cl = model(x), model(x_cl)
    assert torch.equal(compiled, same_pi) and torch.equal(compiled_cl, same_pi_cl)
    assert compiled_cl.is_contiguous(memory_format=torch.channels_last) == python_cl.is_contiguous(
        memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(compiled, expected, rtol=tol, atol=tol)


def test_compiled_fused_call_refuses_a_wrong_kernel_shape(kernel):
    x = torch.randn(1, 4, 6, 6)
    router = (torch.randn(4, 4), None, None, None, None, None, 0.0, torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match="dyn must be"):
        kernel.routed_fused_single_sample_conv(x, *router, 1.0, False, torch.randn(3, 5, 2, 3, 3), None, None, None,
                                               3, 3, 1, 1, 1, 1, 1, 1, 1, 1, False, 16, 1, 64, 1 << 20, None)
    with pytest.raises(RuntimeError, match="one sample"):
        kernel.routed_fused_single_sample_conv(torch.randn(2, 4, 6, 6), *router, 1.0, False,
                                               torch.randn(3, 5, 4, 3, 3), None, None, None,
                                               3, 3, 1, 1, 1, 1, 1, 1, 1, 1, False, 16, 1, 64, 1 << 20, None)
    with pytest.raises(RuntimeError, match="packed must hold"):
        kernel.routed_fused_single_sample_conv(x, *router, 1.0, False, torch.randn(3, 5, 4, 3, 3), None, None, None,
                                               3, 3, 1, 1, 1, 1, 1, 1, 1, 1, False, 16, 1, 64, 1 << 20,
                                               torch.randn(3 * 5 * 36 - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_kernels", [1, 3, 4, 9])
def test_packed_factors_give_the_row_layouts_numbers_to_the_bit(kernel, dtype, num_kernels):
    """``pack_fused_factors`` + ``fused_dynamic_conv_packed`` equal ``fused_dynamic_conv`` on the factors' row
    layout bit for bit: tiles that do not divide the rows, chunks that do not divide the columns, columns that
    are not whole vectors (the packed tail), more kernels than the vectorised mix takes (9), a static part,
    several samples per work item; the packed copy is a permutation of the factors."""
    torch.manual_seed(13)
    for out_channels, columns, pixels, batch, tiles in [(10, 27, 7, 1, (4, 1, 64)), (37, 577, 16, 1, (12, 1, 256)),
                                                        (24, 300, 64, 3, (8, 2, 128)), (5, 8, 1, 2, (16, 8, 64))]:
        dyn = torch.randn(num_kernels, out_channels, columns, dtype=dtype)
        cols = torch.randn(batch, columns, pixels, dtype=dtype)
        pi = torch.softmax(torch.randn(batch, num_kernels, dtype=dtype), -1)
        packed = kernel.pack_fused_factors(dyn, tiles[0], tiles[2])
        assert packed.shape == (dyn.numel(),) and torch.equal(packed.sort().values, dyn.flatten().sort().values)
        for sta in (None, torch.randn(out_channels, columns, dtype=dtype)):
            rows = kernel.fused_dynamic_conv(cols, pi, dyn, sta, *tiles)
            got = kernel.fused_dynamic_conv_packed(cols, pi, packed, num_kernels, out_channels, sta, *tiles)
            assert torch.equal(got, rows), (out_channels, columns, pixels, batch, tiles)
            expected = torch.einsum("bk,koc,bcl->bol", pi.double(), dyn.double(), cols.double())
            if sta is not None:
                expected += torch.einsum("oc,bcl->bol", sta.double(), cols.double())
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_packed_factors_refuse_bad_arguments(kernel):
    dyn = torch.randn(2, 6, 20)
    with pytest.raises(RuntimeError, match="CPU float32/float64 tensor"):
        kernel.pack_fused_factors(dyn[0], 4, 64)
    with pytest.raises(RuntimeError, match="CPU float32/float64 tensor"):
        kernel.pack_fused_factors(dyn.half(), 4, 64)
    with pytest.raises(RuntimeError, match="chunk of 64, 128 or 256"):
        kernel.pack_fused_factors(dyn, 4, 100)
    packed = kernel.pack_fused_factors(dyn, 4, 64)
    cols, pi = torch.randn(1, 20, 5), torch.rand(1, 2)
    with pytest.raises(RuntimeError, match="packed must hold"):
        kernel.fused_dynamic_conv_packed(cols, pi, packed[:-1], 2, 6, None, 4, 1, 64)
    with pytest.raises(RuntimeError, match="packed must hold"):
        kernel.fused_dynamic_conv_packed(cols, pi, packed, 2, 5, None, 4, 1, 64)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel.fused_dynamic_conv_packed(cols, pi, packed.double(), 2, 6, None, 4, 1, 64)


def test_compiled_bmm_call_refuses_wrong_shapes(kernel):
    x = torch.randn(1, 4, 6, 6)
    router = (torch.randn(4, 4), None, None, None, None, None, 0.0, torch.randn(3, 4), None)
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, 1, 1, False, True, 1 << 20)
    with pytest.raises(RuntimeError, match="dyn must be"):
        kernel.routed_bmm_single_sample_conv(x, *router, 1.0, False, torch.randn(3, 5, 2, 3, 3), None, None, None,
                                             *geometry)
    with pytest.raises(RuntimeError, match="sta must be"):
        kernel.routed_bmm_single_sample_conv(x, *router, 1.0, False, torch.randn(3, 5, 4, 3, 3),
                                             torch.randn(4, 4, 3, 3), None, None, *geometry)
    with pytest.raises(RuntimeError, match="one sample"):
        kernel.routed_bmm_single_sample_conv(torch.randn(2, 4, 6, 6), *router, 1.0, False,
                                             torch.randn(3, 5, 4, 3, 3), None, None, None, *geometry)


def test_batch_one_bmm_with_several_channel_tiles_keeps_the_python_loop(kernel, tuning, monkeypatch):
    """A sample's kernel larger than one tile of the per-sample GEMM: no compiled call (it runs one tile),
    the Python loop over channel tiles, the same numbers as the literal formula."""
    from padnet.layers import dynamic_conv as layer_module
    from padnet.ops import bmm_kernels

    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        "bmm" if "bmm" in candidates else candidates[0])
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "weights", 3 * 5 * 9 * 4)  # 3 output channels per tile
    calls = spy_routed(monkeypatch)
    torch.manual_seed(8)
    layer = DynamicConv2d(5, 10, 3, padding=1, bias=True).eval()
    literal = copy.deepcopy(layer)
    literal.backend = "weight"
    x = torch.randn(1, 5, 7, 7)
    with torch.no_grad():
        y = layer(x)
        expected = literal(x)
    assert layer.__dict__["_single_sample_choice"][1] == ("bmm", None) and not calls
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_batch_one_trial_times_each_candidate_as_the_layer_runs_it(kernel, tuning, monkeypatch):
    """The batch-1 tuner times every candidate through its compiled one-call forward (the layer's path),
    with a bias where the layer has one; the memory format and the bias are part of the signature, so a
    channels_last input is tuned on its own; the functional API (Python path) is tuned without them."""
    from padnet.ops import backend_selection as selection

    tuned, ran = [], []

    def tune(key, candidates, run, device, budget_s=None):
        tuned.append(key)
        for name in candidates:
            run(name)
        return "bmm"

    real = selection.routed_call

    def spying(x, dyn, geom, backend, padding=None):
        found = real(x, dyn, geom, backend, padding)
        if found is None:
            return None
        function, tail = found
        return (lambda *a: ran.append((backend, a[15] is not None, a[0].is_contiguous())) or function(*a)), tail

    monkeypatch.setattr(autotune, "tune", tune)
    monkeypatch.setattr(selection, "routed_call", spying)
    torch.manual_seed(9)
    layer = DynamicConv2d(6, 8, 3, padding=1, bias=True).eval()
    x = torch.randn(1, 6, 9, 9)
    with torch.no_grad():
        y = layer(x)
        y_cl = layer(x.contiguous(memory_format=torch.channels_last))
        layer(x)  # decided: no new tuning
    assert len(tuned) == 2
    assert ran == [(name, True, True) for name in ("weight", "fused", "bmm")] + \
        [(name, True, False) for name in ("weight", "fused", "bmm")]
    assert layer.__dict__["_single_sample_choice"][1][0] == "bmm"
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # the functional API runs the Python path: tuned on its own signature, never through a compiled call
    dyn, sta, bias_dyn, bias_sta = layer.combined_factors()
    with torch.no_grad():
        pi = layer.routing_weights(x)
        y_functional = ops.dynamic_conv2d(x, pi, dyn, sta, bias_dyn, bias_sta, 1, 1, 1, 1)
    assert len(tuned) == 3 and len(ran) == 6
    torch.testing.assert_close(y_functional, y, rtol=1e-5, atol=1e-5)


def test_compiled_fused_call_after_inference_mode_then_no_grad(kernel, tuning, monkeypatch):
    """The compiled fused call keeps an im2col buffer per thread: one made under torch.inference_mode (an
    inference tensor) must not be written by a later plain no_grad call -- it is replaced, and both calls
    give the same numbers; float64 after float32 uses its own buffer."""
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        "fused" if "fused" in candidates else candidates[0])
    calls = spy_routed(monkeypatch)
    torch.manual_seed(6)
    layer = DynamicConv2d(5, 9, 3, padding=1).eval()
    x = torch.randn(1, 5, 23, 21)  # a larger im2col than the other tests (a fresh buffer size)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        second = layer(x)
        double = layer.double()(x.double())
    assert len(calls) == 3 and torch.equal(first, second)
    torch.testing.assert_close(double.float(), second, rtol=1e-5, atol=1e-5)


def test_batch_one_fused_call_keeps_packed_factors_while_they_are_valid(kernel, tuning, monkeypatch):
    """The compiled fused call runs on the factors packed for its tiles, kept in the layer's inference cache:
    packed once, repacked after an optimizer-style in-place update (the output follows the new weights), after
    a thread-count change (another decision, other tiles) and never with ``cache_weights`` off; an autograd
    forward frees it; a compact layer keeps its own."""
    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        "fused" if "fused" in candidates else candidates[0])
    packs = []
    real_pack = fused.packed_routed_tail
    from padnet.layers import dynamic_conv as layer_module

    monkeypatch.setattr(layer_module, "packed_routed_tail", lambda dyn, tail: packs.append(1) or real_pack(dyn, tail))
    calls = spy_routed(monkeypatch)
    torch.manual_seed(8)
    layer = DynamicConv2d(6, 10, 3, padding=1, bias=True).eval()
    x = torch.randn(1, 6, 7, 7)

    def python_path():
        literal = copy.deepcopy(layer)
        literal.backend = "weight"
        with torch.no_grad():
            return literal(x)

    with torch.no_grad():
        first, again = layer(x), layer(x)
    assert len(calls) == 2 and len(packs) == 1 and torch.equal(first, again)
    assert "fused_packed" in layer.__dict__["_inference_cache"]
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):  # a per-process cache: not copied
        assert "_inference_cache" not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone(x), first)  # (packed again in the clone)
    assert len(packs) == 3
    torch.testing.assert_close(first, python_path(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight_dynamic.mul_(-0.5)  # as an optimizer step: in place
        updated = layer(x)
    assert len(packs) == 4 and not torch.allclose(updated, first)
    torch.testing.assert_close(updated, python_path(), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            two = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert len(packs) == 5
    torch.testing.assert_close(two, updated, rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()  # autograd: the inference cache, packed copy included, is freed
    assert "fused_packed" not in layer.__dict__.get("_inference_cache", {})
    compact = CompactDynamicConv2d(layer).eval()
    with torch.no_grad():
        compact_out = compact(x)
    assert len(packs) == 6 and "fused_packed" in compact.__dict__["_inference_cache"]
    torch.testing.assert_close(compact_out, updated, rtol=1e-5, atol=1e-5)
    compact(x).sum().backward()  # autograd frees it here too
    assert "fused_packed" not in compact.__dict__.get("_inference_cache", {})
    with torch.no_grad():
        compact(x)
    assert len(packs) == 7
    compact.cache_weights = False  # no inference copies: the row layout, the copy dropped
    with torch.no_grad():
        assert torch.equal(compact(x), compact_out)  # the row layout: the same numbers
    assert len(packs) == 7 and "fused_packed" not in compact.__dict__.get("_inference_cache", {})


def test_compiled_fused_call_above_the_workspace_limit_allocates_fresh(kernel, tuning, monkeypatch):
    from padnet.ops import fused as fused_module

    monkeypatch.setattr(autotune, "tune", lambda key, candidates, run, device, budget_s=None:
                        "fused" if "fused" in candidates else candidates[0])
    monkeypatch.setattr(fused_module, "WORKSPACE_LIMIT", 0)  # every buffer is "too large": fresh each call
    calls = spy_routed(monkeypatch)
    torch.manual_seed(7)
    layer = DynamicConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 1 and layer.__dict__["_single_sample_choice"][1][1][1][-2] == 0
    literal = copy.deepcopy(layer)
    literal.backend = "weight"
    with torch.no_grad():
        torch.testing.assert_close(y, literal(x), rtol=1e-5, atol=1e-5)


# ---- the compiled factor GEMMs of the tiled weight-space conv (mix_factors, factor_grad_pass) ----

def _tiled_weight_space_grads(x, logits, dyn, gy):
    from padnet.ops.bmm_autograd import WeightSpaceBMM

    geom = backend_selection.conv_geometry((3, 3), 1, 1, 1, 1)
    for t in (x, logits, dyn):
        t.grad = None
    y = WeightSpaceBMM.apply(x, torch.softmax(logits, -1), dyn, None, geom)
    y.backward(gy)
    return y.detach(), x.grad, logits.grad, dyn.grad


@pytest.mark.parametrize("num_kernels", [1, 2, 3, 4, 5, 8])  # 2, 4, 8: the unrolled kernels; others generic
def test_compiled_factor_gemms_equal_mkl_in_the_tiled_conv(kernel, monkeypatch, num_kernels):
    """The tiled weight-space conv with many batch and channel tiles (accumulation over batch tiles, column
    ranges of the factors): values and every gradient with the compiled kernels equal the MKL path's and
    a per-sample reference (float64)."""
    from padnet.ops import bmm_kernels

    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "weights", 2048)
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "cols", 4096)
    torch.manual_seed(num_kernels)
    x = torch.randn(7, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(7, num_kernels, dtype=torch.float64, requires_grad=True)
    dyn = torch.randn(num_kernels, 9, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(7, 9, 6, 7, dtype=torch.float64)
    assert bmm_kernels.StoredFactors(dyn).compiled is not None
    compiled = _tiled_weight_space_grads(x, logits, dyn, gy)
    monkeypatch.setenv("PADNET_FUSED", "0")
    assert bmm_kernels.StoredFactors(dyn).compiled is None
    mkl = _tiled_weight_space_grads(x, logits, dyn, gy)
    for a, b in zip(compiled, mkl):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    pi = torch.softmax(logits, -1)
    ref = torch.cat([F.conv2d(x[b:b + 1], torch.einsum("k,k...->...", pi[b], dyn), None, 1, 1) for b in range(7)])
    want = torch.autograd.grad(ref, (x, logits, dyn), gy)
    for a, b in zip(compiled[1:], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_compiled_factor_gemms_do_not_depend_on_the_thread_count(kernel, at_one_and_two_threads):
    """dL/dpi and the scales are summed per fixed block of entries, in block order: float32 results are
    bit for bit the same with 1 and 2 threads (fully dynamic and element factors)."""
    from padnet.ops import masked_conv

    torch.manual_seed(9)
    x = torch.randn(6, 16, 8, 8, requires_grad=True)
    logits = torch.randn(6, 4, requires_grad=True)
    dyn = torch.randn(4, 40, 16, 3, 3, requires_grad=True)  # 5,760 entries: several blocks, a partial one
    sta = torch.randn(40, 16, 3, 3, requires_grad=True)
    mask = (torch.rand(40, 16, 3, 3) < 0.3).float()
    phi = torch.tensor(0.2, requires_grad=True)
    gy = torch.randn(6, 40, 8, 8)
    geom = backend_selection.conv_geometry((3, 3), 1, 1, 1, 1)

    def both():
        plain = _tiled_weight_space_grads(x, logits, dyn, gy)
        leaves = (x, logits, dyn, sta, phi)
        lambda_d = 2 * torch.sigmoid(phi)
        y = masked_conv.MaskedWeightSpaceBMM.apply(x, torch.softmax(logits, -1), dyn, sta, mask, 2 - lambda_d,
                                                   lambda_d, geom, True)
        return plain + (y.detach(),) + torch.autograd.grad(y, leaves, gy)

    one, two = at_one_and_two_threads(both)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_factor_gemms_refuse_bad_operands_with_the_reason(kernel):
    """The kernels check what their wrappers never pass (shapes, dtypes, half-given element operands,
    finishing without element factors), before writing anything."""
    dyn, pi = torch.randn(3, 50), torch.softmax(torch.randn(4, 3), -1)
    out = torch.zeros(4, 50)
    with pytest.raises(RuntimeError, match="both sta and mask"):
        kernel.mix_factors(pi, dyn, torch.randn(50), None, 1.0, 1.0, out)
    with pytest.raises(RuntimeError, match=r"out must be \[4, 50\]"):
        kernel.mix_factors(pi, dyn, None, None, 1.0, 1.0, torch.zeros(4, 49))
    with pytest.raises(RuntimeError, match="pi must be"):
        kernel.mix_factors(pi[:, :2], dyn, None, None, 1.0, 1.0, out)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        kernel.mix_factors(pi.half(), dyn.half(), None, None, 1.0, 1.0, out.half())
    with pytest.raises(RuntimeError, match="1 <= K <= 64"):
        kernel.mix_factors(torch.ones(4, 65) / 65, torch.randn(65, 50), None, None, 1.0, 1.0, out)
    assert not out.any()
    gw, g = torch.randn(4, 50), torch.zeros(3, 50)
    with pytest.raises(RuntimeError, match="finish maps element"):
        kernel.factor_grad_pass(gw, pi, dyn, None, None, 1.0, 1.0, g, False, True, True, None, None)
    with pytest.raises(RuntimeError, match=r"gw must be \[4, 50\]"):
        kernel.factor_grad_pass(gw[:, :40], pi, dyn, None, None, 1.0, 1.0, g, False, False, True, None, None)
    with pytest.raises(RuntimeError, match="gpi must be"):
        kernel.factor_grad_pass(gw, pi, dyn, None, None, 1.0, 1.0, g, False, False, True, torch.zeros(3, 3), None)
    with pytest.raises(RuntimeError, match="g_sta is written only when finishing"):
        kernel.factor_grad_pass(gw, pi, dyn, torch.randn(50), torch.ones(50), 1.0, 1.0, g, False, False, True,
                                None, torch.zeros(50))
    assert not g.any()


def test_compiled_factor_gemms_fall_back_to_mkl_where_they_cannot_serve(kernel, monkeypatch):
    from padnet.ops import bmm_kernels

    assert bmm_kernels.compiled_factor_gemms(torch.float32, torch.device("cpu"), 4) is not None
    assert bmm_kernels.compiled_factor_gemms(torch.bfloat16, torch.device("cpu"), 4) is None
    assert bmm_kernels.compiled_factor_gemms(torch.float32, torch.device("cpu"), 65) is None  # too many factors
    assert bmm_kernels.compiled_factor_gemms(torch.float32, torch.device("meta"), 4) is None
    monkeypatch.setenv("PADNET_FUSED", "0")
    assert bmm_kernels.compiled_factor_gemms(torch.float32, torch.device("cpu"), 4) is None


def _factor_reference(pi, dyn, sta, mask, ls, ld):
    """F (stored) or F' (element) in float64."""
    d = dyn.double()
    if mask is None:
        return d
    m = mask.double()
    return ld * m * d + ls * (1 - m) * sta.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# unrolled variants (2, 4, 8) and the generic one; with B = 5 samples K = 2, 3, 4 form the element rows once
# per block, K = 5 and 8 apply them per vector (B <= K)
@pytest.mark.parametrize("num_kernels", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [4608, 4133])  # several blocks; whole vectors (streaming stores) or a ragged tail
@pytest.mark.parametrize("element", [False, True])
def test_factor_gemm_kernels_match_float64_references(kernel, dtype, num_kernels, n, element):
    """``mix_factors`` and ``factor_grad_pass`` on column ranges of wider matrices, several blocks, both
    store paths, accumulation onto an earlier batch tile, and (element) the finishing map with and without
    dL/dW and dL/dWs: against float64 references."""
    torch.manual_seed(num_kernels + n)
    B, lo, width = 5, 37, n + 100
    big = torch.randn(num_kernels, width, dtype=dtype)
    dyn = big[:, lo:lo + n]  # rows `width` apart: a column range
    sta = torch.randn(width, dtype=dtype)[lo:lo + n] if element else None
    mask = (torch.rand(n) < 0.3).to(dtype) if element else None
    ls, ld = (0.7, 1.3) if element else (0.0, 0.0)
    pi = torch.softmax(torch.randn(B, num_kernels, dtype=dtype), -1)
    f = _factor_reference(pi, dyn, sta, mask, ls, ld)
    tol = dict(rtol=1e-12, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)

    out = torch.empty(B, n, dtype=dtype)  # fresh: 64-byte aligned; rows whole vectors only for n = 4608
    kernel.mix_factors(pi, dyn, sta, mask, ls, ld, out)
    torch.testing.assert_close(out.double(), pi.double() @ f, **tol)

    gw = torch.randn(B, n, dtype=dtype)
    prior = torch.randn(num_kernels, width, dtype=dtype)
    g = prior.clone()
    gpi0 = torch.randn(B, num_kernels, dtype=dtype)
    gpi = gpi0.clone()
    kernel.factor_grad_pass(gw, pi, dyn, sta, mask, ls, ld, g[:, lo:lo + n], True, False, True, gpi, None)
    raw = prior[:, lo:lo + n].double() + pi.double().t() @ gw.double()
    torch.testing.assert_close(g[:, lo:lo + n].double(), raw, **tol)
    assert torch.equal(g[:, :lo], prior[:, :lo]) and torch.equal(g[:, lo + n:], prior[:, lo + n:])
    torch.testing.assert_close(gpi.double(), gpi0.double() + gw.double() @ f.t(), **tol)
    if not element:
        return
    m = mask.double()
    for need_d, with_sta in [(True, True), (False, True), (True, False), (False, False)]:
        g = prior.clone()
        g_sta = torch.full((n,), 7.0, dtype=dtype)
        g_ls, g_ld = kernel.factor_grad_pass(gw, pi, dyn, sta, mask, ls, ld, g[:, lo:lo + n], True, True, need_d,
                                             None, g_sta if with_sta else None)
        if need_d:
            torch.testing.assert_close(g[:, lo:lo + n].double(), ld * m * raw, **tol)
        else:  # dL/dF itself, copied from the block's buffer
            torch.testing.assert_close(g[:, lo:lo + n].double(), raw, **tol)
        assert torch.equal(g[:, :lo], prior[:, :lo]) and torch.equal(g[:, lo + n:], prior[:, lo + n:])
        if with_sta:
            torch.testing.assert_close(g_sta.double(), ls * (1 - m) * raw.sum(0), **tol)
        else:
            assert torch.equal(g_sta, torch.full((n,), 7.0, dtype=dtype))
        want_ls = float(((1 - m) * raw.sum(0) * sta.double()).sum())
        want_ld = float((m * raw * dyn.double()).sum())
        scale = max(1.0, abs(want_ls), abs(want_ld))
        assert abs(g_ls - want_ls) / scale < (1e-10 if dtype == torch.float64 else 1e-4)
        assert abs(g_ld - want_ld) / scale < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("geometry", [dict(stride=2, padding=1, dilation=1, kernel=3),
                                      dict(stride=1, padding=2, dilation=2, kernel=3),
                                      dict(stride=2, padding=0, dilation=1, kernel=1)])
@pytest.mark.parametrize("element", [False, True])
def test_tiled_conv_with_compiled_factor_gemms_matches_per_sample_reference(kernel, monkeypatch, geometry, element):
    """Strided, dilated and pointwise geometries through the tiled conv with the compiled factor GEMMs
    (several batch tiles of two samples, several channel tiles), fully dynamic and element factors:
    values and every gradient against a per-sample reference (float64)."""
    from padnet.layers.modes import combine_factors
    from padnet.ops import bmm_kernels, masked_conv
    from padnet.ops.bmm_autograd import WeightSpaceBMM

    kh = geometry["kernel"]
    ck = 6 * kh * kh
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "cols", 2 * ck * 64 * 8)  # two samples of <= 64 pixels
    monkeypatch.setitem(bmm_kernels.TILE_BUDGET, "weights", 2 * ck * 3 * 8)  # three output channels
    torch.manual_seed(kh + geometry["stride"])
    x = torch.randn(5, 6, 8, 7, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    dyn = torch.randn(4, 8, 6, kh, kh, dtype=torch.float64, requires_grad=True)
    sta = torch.randn(8, 6, kh, kh, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(8, 6, kh, kh) < 0.4).double()
    phi = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    geom = backend_selection.conv_geometry((kh, kh), geometry["stride"], geometry["padding"],
                                           geometry["dilation"], 1)
    pi = torch.softmax(logits, -1)
    lambda_d = 2 * torch.sigmoid(phi)
    assert bmm_kernels.StoredFactors(dyn).compiled is not None
    if element:
        leaves = (x, logits, dyn, sta, phi)
        y = masked_conv.MaskedWeightSpaceBMM.apply(x, pi, dyn, sta, mask, 2 - lambda_d, lambda_d, geom, True)
        d, s = combine_factors(dyn, sta, mask, 2 - lambda_d, lambda_d)
        kernels = torch.einsum("bk,k...->b...", pi, d) + s
    else:
        leaves = (x, logits, dyn)
        y = WeightSpaceBMM.apply(x, pi, dyn, None, geom)
        kernels = torch.einsum("bk,k...->b...", pi, dyn)
    ref = torch.cat([F.conv2d(x[b:b + 1], kernels[b], None, geometry["stride"], geometry["padding"],
                              geometry["dilation"]) for b in range(5)])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    for a, b in zip(got, torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
