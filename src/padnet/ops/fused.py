"""Fused per-sample dynamic conv: a C++/OpenMP kernel, built on first use and cached (inference, CPU).

For deep layers (few output pixels per sample) the per-sample kernels are the
problem: at 512@4 and batch 32 they are 288 MiB, which the other backends write
and read back (or, tiled, stream through main memory in pieces). The kernel in
``csrc/fused_dynamic_conv.cpp`` forms each sample's kernel rows for a tile of
16 output channels in a thread-local buffer and multiplies them with the
sample's unfolded input at once, so they never leave L1/L2.

With ``PADNET_FUSED=1`` it is one more *candidate* of the autotuner
(:mod:`.backend_selection`), used only where it measured fastest, and only for
inference (no autograd), CPU, ``groups == 1``, float32/float64. It is **off by
default**: in its first (smoke, machine under load) measurement it was 2-10x
slower than the best PyTorch backend at the ResNet-18 shapes, so building it
(about a minute of compiler time inside a user's first call) would buy nothing
yet. Building needs a C++ compiler (and ninja); later processes load the
cached library from ``$PADNET_EXTENSIONS_DIR`` or ``<padnet cache dir>/extensions/``
(keyed by torch version, CPU model and source). Without a compiler the
pure-PyTorch backends are used and nothing else changes (one warning).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .autotune import cache_dir, cpu_model
from .geometry import ConvGeometry
from .im2col import im2col_workspace

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_dynamic_conv.cpp"
_MODULE: ModuleType | None = None
_FAILED: str | None = None  # why the build failed (not retried in this process)


def fused_enabled() -> bool:
    """``PADNET_FUSED`` (default off): whether the fused kernel may be built and used."""
    return os.environ.get("PADNET_FUSED", "0").strip().lower() in ("1", "true", "yes", "on")


def build_directory() -> Path:
    """Cache directory of the compiled kernel: per torch version, CPU model (``-march=native``) and source.

    Under ``$PADNET_EXTENSIONS_DIR`` if set, else ``<cache dir>/extensions``.
    """
    digest = hashlib.sha1(
        "\n".join([torch.__version__, cpu_model(), SOURCE.read_text(encoding="utf-8")]).encode()
    ).hexdigest()[:16]
    root = os.environ.get("PADNET_EXTENSIONS_DIR")
    return (Path(root) if root else cache_dir() / "extensions") / f"fused_dynamic_conv-{digest}"


def load_fused(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module (building it the first time), or ``None`` if disabled or not buildable."""
    global _MODULE, _FAILED
    if _MODULE is not None:
        return _MODULE
    if _FAILED is not None or not fused_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        _MODULE = load(
            name="padnet_fused_dynamic_conv", sources=[str(SOURCE)], build_directory=str(directory),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=verbose,
        )
    except Exception as exc:  # no compiler / ninja / headers: fall back to the pure-PyTorch backends
        _FAILED = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"padnet: the fused dynamic-conv kernel could not be built ({_FAILED.splitlines()[0]}); "
                      "using the pure-PyTorch backends", RuntimeWarning, stacklevel=2)
        return None
    return _MODULE


def fused_applicable(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, groups: int, grad: bool) -> bool:
    """Whether the fused kernel can run this call (it is then built if needed): inference, CPU, groups 1, fp32/64."""
    if grad or groups != 1 or x.device.type != "cpu" or x.shape[0] < 2 or not fused_enabled():
        return False
    dtypes = {x.dtype, pi.dtype, dyn.dtype} | ({sta.dtype} if sta is not None else set())
    if len(dtypes) != 1 or x.dtype not in (torch.float32, torch.float64):
        return False
    return load_fused() is not None


def fused_dynamic_conv2d(x: Tensor, pi: Tensor, dyn: Tensor, sta: Tensor | None, geom: ConvGeometry,
                         padding=None) -> Tensor:
    """``[B, O, H', W']`` per-sample conv by the fused kernel (no autograd; raises if it is unavailable)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pi, dyn, sta)):
        raise RuntimeError("the fused dynamic-conv kernel has no backward; use it for inference only")
    if geom.groups != 1:
        raise ValueError("the fused dynamic-conv kernel supports groups == 1 only")
    module = load_fused()
    if module is None:
        raise RuntimeError(f"the fused dynamic-conv kernel is unavailable ({_FAILED or 'PADNET_FUSED=0'})")
    ho, wo = geom.out_hw(x.shape[-2:])
    k, o = dyn.shape[0], dyn.shape[1]
    with torch.no_grad():
        cols = im2col_workspace(x, geom)
        y = module.fused_dynamic_conv(cols, pi.contiguous(), dyn.reshape(k, o, -1),
                                      None if sta is None else sta.reshape(o, -1), torch.get_num_threads())
    return y.view(x.shape[0], o, ho, wo)


__all__ = ["build_directory", "fused_applicable", "fused_dynamic_conv2d", "fused_enabled", "load_fused"]
