"""Fused per-sample dynamic conv, element-PAD folding and the one-call batch-1 forward: C++ kernels, compiled once per machine and cached (CPU).

For deep layers (few output pixels per sample) the per-sample kernels are the
problem: at 512@4 and batch 32 they are 288 MiB, which the other backends write
and read back (or, tiled, stream through main memory in pieces). The kernel in
``csrc/fused_dynamic_conv.cpp`` mixes, per tile of 16 output channels and 32
samples, the samples' kernel rows chunk by chunk into a per-thread buffer that
stays in L2 (each load of the K kernels serves all 32 samples) and consumes
them at once in a register-blocked GEMM, so they never reach main memory.

It is one more *candidate* of the autotuner (:mod:`.backend_selection`), used
only where it measured fastest, and only for inference (no autograd), CPU,
``groups == 1``, float32/float64.

The same library holds the one-pass kernels of element-PAD training
(``fold_factors``, ``fold_factor_grads``; :mod:`.masked_factors` calls them for
contiguous float32/float64 CPU parameters, one column range at a time): forming the folded factors
``F'_k = lambda_d M W_k + lambda_s (1 - M) W_s`` and mapping their gradient
back through the mask, each reading the weights once instead of a chain of
aten ops with temporaries. It holds the factor GEMMs of the tiled weight-space
conv's training path (``mix_factors``, ``factor_grad_pass``;
:class:`.bmm_kernels.StoredFactors` and :class:`.masked_factors.ElementFactors`
call them): a tile's per-sample kernels ``pi @ F`` written with streaming
stores, and ``dL/dF`` with ``dL/dpi`` in one pass over the kernels' gradient
(MKL's two GEMMs read it twice); for an element-masked layer ``F'`` is formed
per block inside both, and its gradient is mapped to the parameters' in the
same pass. And it holds ``routed_single_sample_conv`` and
``routed_fused_single_sample_conv`` (:func:`routed_call`): a layer's whole
batch-1 inference call -- the default router, routing weights, and the
sample's kernel with one plain conv, or im2col with the fused kernel -- as one
call from Python running the same ATen ops and kernels (the same result to the
bit), because at batch 1 the interpreter's work between the ops is a
measurable part of the call. ``PADNET_FUSED`` decides whether the library may be used:

- ``auto`` (default): use the compiled library if it is already in the cache
  (``bash scripts/setup.sh`` builds it: ``python -m padnet.ops.build_fused``); never
  compile inside a forward call;
- ``1`` / ``on``: also compile it on first use (about a minute, once);
- ``0`` / ``off``: never.

Building needs a C++ compiler (and ninja); the library is cached under
``$PADNET_EXTENSIONS_DIR`` or ``<padnet cache dir>/extensions/``, keyed by
torch version, CPU model and feature flags (it is built with ``-march=native``),
the Python extension suffix and the source.
Without it the pure-PyTorch backends are used and nothing else changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .autotune import cache_dir, cpu_features, cpu_model, forget_decisions
from .geometry import ConvGeometry
from .im2col import im2col_workspace
from .workspace import WORKSPACE_LIMIT

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_dynamic_conv.cpp"
_MODULE: ModuleType | None = None
_FAILED: str | None = None  # why the build failed (not retried in this process)
_ABSENT_AT: tuple | None = None  # the cache location where ``auto`` found no build (not looked up again)


MODULE_NAME = "padnet_fused_dynamic_conv"
_MODES = {"auto": "auto", "": "auto", "1": "on", "true": "on", "yes": "on", "on": "on",
          "0": "off", "false": "off", "no": "off", "off": "off"}


def fused_mode() -> str:
    """``PADNET_FUSED``: ``"auto"`` (default: use a cached build only), ``"on"`` (build on first use) or ``"off"``.

    Raises ``ValueError`` naming the variable for any other value.
    """
    raw = os.environ.get("PADNET_FUSED", "auto")
    mode = _MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"PADNET_FUSED={raw!r}: expected auto, 1/on or 0/off")
    return mode


def fused_enabled() -> bool:
    """Whether the fused kernel may be used at all (``PADNET_FUSED`` is not off)."""
    return fused_mode() != "off"


def build_directory() -> Path:
    """Cache directory of the compiled kernel, keyed by everything the binary depends on.

    torch version, CPU model and feature flags (it is built with ``-march=native``:
    loading a library built for other instructions would crash with SIGILL), the Python
    extension suffix (interpreter / ABI) and the source. Under
    ``$PADNET_EXTENSIONS_DIR`` if set, else ``<cache dir>/extensions``.
    """
    root = os.environ.get("PADNET_EXTENSIONS_DIR")
    return (Path(root) if root else cache_dir() / "extensions") / f"fused_dynamic_conv-{_digest()}"


def kernel_tag() -> str:
    """Short identity of the compiled kernel (torch, CPU, interpreter, source): part of the autotune keys
    that time it, so a rebuilt kernel is tuned again."""
    return _digest()


def library_key() -> tuple[str, ...]:
    """``("fused:<kernel_tag>",)`` while the compiled library is in use, else ``()``: the suffix of every
    autotune key whose timings depend on it (the fused candidate, the C++ im2col of the GEMM backends)."""
    return (f"fused:{kernel_tag()}",) if load_fused() is not None else ()


def _digest() -> str:
    """Hash of what the binary depends on (the source is read and hashed once per process)."""
    return _hash_parts((torch.__version__, cpu_model(), cpu_features(), str(sysconfig.get_config_var("EXT_SUFFIX")),
                        _source_digest()))


@lru_cache(maxsize=8)
def _hash_parts(parts: tuple[str, ...]) -> str:  # (autotune keys ask for the tag on every call)
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _source_digest() -> str:
    return hashlib.sha1(SOURCE.read_bytes()).hexdigest()


def library_path() -> Path:
    """Where the compiled library of this torch / CPU / source lives (it may not exist yet)."""
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return build_directory() / f"{MODULE_NAME}{suffix}"


def _import_prebuilt() -> ModuleType | None:
    """The cached library, imported without compiling anything, or ``None`` if there is none."""
    path = library_path()
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_fused(verbose: bool = False) -> ModuleType:
    """Compile the kernel into :func:`build_directory` (a no-op if it is up to date) and import it.

    Raises whatever the compiler toolchain raises (no compiler, no ninja, no headers).
    """
    global _ABSENT_AT
    from torch.utils.cpp_extension import load

    _ABSENT_AT = None
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=MODULE_NAME, sources=[str(SOURCE)], build_directory=str(directory),
        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=verbose,
    )


def load_fused(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, or ``None`` if it is off, not built (``auto``) or not buildable (``on``)."""
    global _MODULE, _FAILED, _ABSENT_AT
    mode = fused_mode()  # read on every call: PADNET_FUSED=0 turns a loaded library off too
    if mode == "off":
        return None
    if _MODULE is not None:
        return _MODULE
    if _FAILED is not None:
        return None
    if mode == "auto":
        # a missing build is remembered per cache location: the lookup (CPU flags, source hash, stat) would
        # otherwise run on every call that may use the library (im2col runs in every forward)
        where = tuple(os.environ.get(name) for name in
                      ("PADNET_EXTENSIONS_DIR", "PADNET_CACHE_DIR", "XDG_CACHE_HOME", "HOME"))
        if where == _ABSENT_AT:
            return None
    try:
        _MODULE = _import_prebuilt() if mode == "auto" else build_fused(verbose)
        if _MODULE is None:
            _ABSENT_AT = where
        else:
            forget_decisions()  # the rule and the candidates change with the library: decide again
    except Exception as exc:  # no compiler / ninja / headers, or a damaged library: the PyTorch backends serve
        _FAILED = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"padnet: the fused dynamic-conv kernel could not be "
                      f"{'loaded' if mode == 'auto' else 'built'} ({_FAILED.splitlines()[0]}); "
                      "using the pure-PyTorch backends", RuntimeWarning, stacklevel=2)
        return None
    return _MODULE


def fused_applicable(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, groups: int, grad: bool) -> bool:
    """Whether the fused kernel can run this call (it is then built if needed): inference, CPU, groups 1, fp32/64."""
    if grad or groups != 1 or x.device.type != "cpu" or not fused_enabled():
        return False
    dtypes = {x.dtype, pi.dtype, dyn.dtype} | ({sta.dtype} if sta is not None else set())
    if len(dtypes) != 1 or x.dtype not in (torch.float32, torch.float64):
        return False
    return load_fused() is not None


def routed_call(x: Tensor, dyn: Tensor, geom: ConvGeometry, backend: str, padding=None):
    """The compiled one-call batch-1 forward as ``(function, tail)``, or ``None`` where it cannot run.

    ``function(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps, fc2_weight,
    fc2_bias, temperature, sigmoid, dyn, sta, bias_dyn, bias_sta, *tail) -> [1, O, H', W']`` runs the
    default router, the routing weights and the conv (one plain conv on the sample's mixed kernel, the
    fused kernel, which never writes it, or one GEMM on it) with the sample's bias, without the
    interpreter's work between them. The router is a few hand-written loops (``route_one``: pool, Linear,
    BatchNorm with running statistics, ReLU, Linear, softmax / sigmoid; as ATen ops they cost tens of
    microseconds a layer), so the routing weights agree with the Python router's to float rounding; the
    rest are the ATen ops and kernels the Python path runs, the same result to the bit given the same
    routing weights:

    - ``backend="weight"``: ``routed_single_sample_conv``, one plain conv on the mixed kernel; ``tail`` is
      ``(stride, padding, dilation, groups)`` (``padding`` numbers, not a string);
    - ``backend="fused"``: ``routed_fused_single_sample_conv``, im2col and the fused kernel (groups 1);
      ``tail`` is the geometry, :func:`fused_tiles` for this shape, the size up to which the im2col
      buffer is kept between calls (:data:`.workspace.WORKSPACE_LIMIT`) and ``None``, the slot of the
      factors' packed copy (:func:`packed_routed_tail` fills it: the layers and the tuner do);
    - ``backend="bmm"``: ``routed_bmm_single_sample_conv``, im2col, the kernel mixed into a kept buffer and
      one GEMM, as :func:`.bmm_kernels.bmm_tiled_forward` runs one sample (groups 1, and only where the
      sample's kernel is one tile of it); ``tail`` is the geometry, whether the compiled ``mix_factors``
      mixes (:func:`.bmm_kernels.compiled_factor_gemms`) and the buffer limit.

    CPU, float32 / float64, the library loaded (``PADNET_FUSED`` not off). Decided once per input shape by
    the layers, which keep the result.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or dyn.dtype != x.dtype \
            or not fused_enabled():
        return None
    lib = load_fused()
    if lib is None:
        return None
    if backend == "weight":
        if type(padding) is not tuple:  # (a string: at::conv2d's numeric overload cannot take it)
            return None
        return lib.routed_single_sample_conv, (geom.stride, tuple(padding), geom.dilation, geom.groups)
    if backend not in ("fused", "bmm") or geom.groups != 1:
        return None
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    ho, wo = geom.out_hw(x.shape[-2:])
    pointwise = bool(geom.pointwise and geom.stride == (1, 1))
    if backend == "bmm":
        from .bmm_kernels import compiled_factor_gemms, tiles  # (bmm_kernels imports this module)

        if tiles(1, dyn.shape[1], x.shape[1] * kh * kw, ho * wo, x.element_size())[1] != dyn.shape[1]:
            return None  # more than one channel tile: the Python loop serves
        compiled_mix = compiled_factor_gemms(dyn.dtype, dyn.device, dyn.shape[0]) is not None
        return lib.routed_bmm_single_sample_conv, (kh, kw, sh, sw, *geom.pad, dh, dw, pointwise, compiled_mix,
                                                   WORKSPACE_LIMIT)
    tile_sizes = fused_tiles(dyn.shape[1], x.shape[1] * kh * kw, ho * wo, 1, x.element_size())
    return lib.routed_fused_single_sample_conv, (kh, kw, sh, sw, *geom.pad, dh, dw, pointwise, *tile_sizes,
                                                 WORKSPACE_LIMIT, None)


def packed_routed_tail(dyn: Tensor, tail: tuple) -> tuple:
    """The ``tail`` of :func:`routed_call`'s fused call with ``dyn [K, O, C, kh, kw]``'s entries packed for its
    tiles (``pack_fused_factors``; its last element, ``None`` there, is the packed copy).

    At batch 1 the fused kernel is bound by reading the K kernels: in their row layout a work item reads
    K x (tile rows) short runs spread over the factors, in the packed layout one run in order: 0.80-0.91 of
    the time at the deep ResNet-18 shapes with the weights cold in cache (``benchmarks/bench_fused_b1.py``,
    docs/benchmarks.md). The numbers are the same to the bit.
    The copy is as large as ``dyn``; the caller keeps it as long as ``dyn`` does not change (the layers:
    in their inference cache, :func:`padnet.layers.modes.cached_derived`).
    """
    lib = load_fused()
    if lib is None or tail[-1] is not None:
        raise ValueError("packed_routed_tail expects the fused call's tail from routed_call, the library loaded")
    rows, chunk = tail[-5], tail[-3]
    return tail[:-1] + (lib.pack_fused_factors(dyn.reshape(dyn.shape[0], dyn.shape[1], -1), rows, chunk),)


def l2_cache_bytes() -> int:
    """L2 cache bytes per core of CPU 0 (Linux sysfs), or 1 MiB where it cannot be read."""
    global _L2_BYTES
    if _L2_BYTES is None:
        _L2_BYTES = 1 << 20
        try:
            for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
                if int((index / "level").read_text()) == 2 and (index / "type").read_text().strip() in ("Data", "Unified"):
                    text = (index / "size").read_text().strip().upper()
                    _L2_BYTES = int(text.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        except (OSError, ValueError):
            pass
    return _L2_BYTES


_L2_BYTES: int | None = None
CHUNKS = (64, 128, 256)  # the column chunks the kernel is compiled for


def register_block_rows(pixels: int, itemsize: int) -> int:
    """Height of the fused kernel's GEMM register block for ``pixels`` output pixels per sample, as the
    compiled library runs it for its vector width: with AVX2 or SSE (16 vector registers) 8 rows for fewer
    than two vectors of pixels, else 6; with AVX-512 16 rows for one vector, 8 for two or three, 4 for four
    or more. 4 where the library is not loaded."""
    module = load_fused()
    if module is None or not hasattr(module, "register_block_rows"):
        return 4
    return int(module.register_block_rows(pixels, itemsize))


def fused_tiles(out_channels: int, columns: int, pixels: int, batch: int, itemsize: int,
                threads: int | None = None) -> tuple[int, int, int]:
    """``(rows, samples, chunk)`` work-item shape of the fused kernel for one conv.

    ``columns`` is ``C*kh*kw``, ``pixels`` the output pixels per sample. A work
    item mixes the kernel rows of a tile of output channels for a group of
    samples (each load of the K kernels serves every sample of the group) and
    multiplies them with the samples' input columns (each chunk of columns
    serves every row of the tile). Tiles of up to 80 rows and groups of 8
    samples measured within 10-15 % of the best fixed tile shape at the
    ResNet-18 shapes, batch 32, on the machine of docs/benchmarks.md (Intel
    Xeon, 2 MiB L2; ``benchmarks/bench_fused_tiles.py``). At batch 1 with few
    pixels (<= 64: the deep layers, where the K kernels' stream dominates) a
    tile is two register blocks high and the chunk 256 columns instead: each
    item then streams few kernel rows at a time in long runs, and the threads
    share many small items (on the Zen 3 machine, weights cold in cache, the
    kernel alone: 1.43x and 1.94x the static conv at 256@8 and 512@4 against
    1.88x and 2.85x with the batch rule's 64 rows and 128 columns; scratch
    timings).
    The tiles are made equal in height (a multiple of the register block's
    height, :func:`register_block_rows`), and few work items (tiles x sample
    groups) a multiple of ``threads`` (default: torch's intra-op thread
    count), because the threads take contiguous runs of items: 77 rows are
    one tile, 154 two, never 64 + 13. The chunk is 128 columns, or 64 if the
    item's mixed rows (``samples x rows x chunk``) would not fit in half the
    L2 cache (:func:`l2_cache_bytes`). The autotuner times the result against
    the other backends, so a poor fit on another CPU costs speed, never
    correctness.
    """
    l2 = l2_cache_bytes()
    block = register_block_rows(pixels, itemsize)
    samples = max(1, min(8, batch))
    few_pixels_at_batch_1 = batch == 1 and pixels <= 64
    rows = 2 * block if few_pixels_at_batch_1 else 80
    blocks = -(-out_channels // block)  # the rows in register blocks: tiles are whole blocks
    chunks = -(-batch // samples)
    threads = torch.get_num_threads() if threads is None else threads
    first = -(-blocks // -(-rows // block))  # tiles of about `rows`
    per_tile = -(-blocks // first)  # (equal heights; kept where no count below balances the threads)
    for tiles in range(first, blocks + 1):
        height = -(-blocks // tiles)
        if -(-blocks // height) == tiles and (tiles * chunks % threads == 0 or tiles * chunks >= 8 * threads):
            per_tile = height  # (3 items on 2 threads would leave one thread idle a third of the time)
            break
    rows = min(out_channels, per_tile * block)
    line = 64 // itemsize
    if few_pixels_at_batch_1 and rows * (256 + line) * itemsize <= l2 // 2:
        return rows, samples, 256  # long runs of each kernel row, fewer passes over the accumulators
    chunk = 128 if samples * rows * (128 + line) * itemsize <= l2 // 2 else 64
    return rows, samples, chunk


def fused_dynamic_conv2d(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry,
                         padding=None, tiles: tuple[int, int, int] | None = None) -> Tensor:
    """``[B, O, H', W']`` per-sample conv by the fused kernel (no autograd; raises if it is unavailable).

    ``tiles`` = ``(rows, samples, chunk)`` overrides :func:`fused_tiles` (benchmarks, tests).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pi, dyn, sta)):
        raise RuntimeError("the fused dynamic-conv kernel has no backward; use it for inference only")
    if geom.groups != 1:
        raise ValueError("the fused dynamic-conv kernel supports groups == 1 only")
    module = load_fused()
    if module is None:
        raise RuntimeError(f"the fused dynamic-conv kernel is unavailable "
                           f"({_FAILED or f'PADNET_FUSED={fused_mode()}, not built: python -m padnet.ops.build_fused'})")
    ho, wo = geom.out_hw(x.shape[-2:])
    k, o = dyn.shape[0], dyn.shape[1]
    with torch.no_grad():
        cols = im2col_workspace(x, geom)
        if tiles is None:
            tiles = fused_tiles(o, cols.shape[1], cols.shape[2], x.shape[0], x.element_size())
        y = module.fused_dynamic_conv(cols, pi.contiguous(), dyn.reshape(k, o, -1),
                                      None if sta is None else sta.reshape(o, -1), *tiles)
    return y.view(x.shape[0], o, ho, wo)


__all__ = ["CHUNKS", "build_directory", "build_fused", "fused_applicable", "fused_dynamic_conv2d",
           "fused_enabled", "fused_mode", "fused_tiles", "kernel_tag", "l2_cache_bytes", "library_key", "library_path", "load_fused",
           "packed_routed_tail", "register_block_rows"]


if __name__ == "__main__":  # the older spelling of the build command (it warns: this module is imported twice)
    from padnet.ops.build_fused import main

    sys.exit(main())
