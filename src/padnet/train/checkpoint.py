"""End-of-epoch training checkpoints: atomic, with the previous one kept until the new one is complete.

``checkpoint.pt`` is one ``torch.save`` file holding the model as the bytes of a
:func:`padnet.save` file (weights, masks, temperatures, PadConfig), the optimizer
and scheduler states, every rank's RNG states (python, numpy, torch, CUDA), the
epoch and step counters, the current temperature, the mode masks, the best test
accuracy, the metrics so far and the partition report.

Writing: the new file goes to a temporary name, is fsynced, the current
``checkpoint.pt`` is renamed to ``checkpoint.prev.pt``, then the temporary file
is renamed to ``checkpoint.pt``. A crash at any point leaves at least one
complete checkpoint. Reading falls back to ``checkpoint.prev.pt`` (with a
warning) when ``checkpoint.pt`` is missing or corrupt.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.serialization import CheckpointError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = "padnet-train-checkpoint"
VERSION = 1


# ------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a ``torch.load(weights_only=True)``-safe form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _as_tuple(x):
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    return x


# ---------------------------------------------------------------- model bytes


def model_bytes(model: nn.Module, workdir: Path) -> bytes:
    """The bytes of ``padnet.save(model)`` (written through a temporary file)."""
    from ..io.serialization import save

    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".safetensors.tmp", dir=workdir)
    os.close(fd)
    try:
        save(model, tmp)
        return Path(tmp).read_bytes()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model_bytes(model: nn.Module, data: bytes, workdir: Path, origin: Path) -> None:
    """Load weights, masks and temperatures written by :func:`model_bytes` into ``model``."""
    from ..io.serialization import load

    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".safetensors.tmp", dir=workdir)
    os.close(fd)
    try:
        Path(tmp).write_bytes(data)
        try:
            load(tmp, model=model, map_location=next(iter(model.parameters())).device)
        except CheckpointError as exc:
            raise CheckpointError(f"{origin}: model in checkpoint does not fit: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mode_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    from ..layers.modes import pad_layers

    out = {}
    for name, layer in pad_layers(model):
        for g in layer.mode_groups():
            out[f"{name}:{g.name}"] = g.mask.detach().cpu().clone()
    return out


# ----------------------------------------------------------------- save/load


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``run_dir/checkpoint.pt``; the old one becomes ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".tmp", dir=run_dir)
    os.close(fd)
    try:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full ...) as RuntimeError
            raise write_failure(tmp, run_dir, exc) from exc
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        from .outputs import publish

        publish(tmp)
        if path.exists():
            os.replace(path, prev)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(run_dir)
    return path


def write_failure(path: str | Path, directory: Path, exc: BaseException) -> OSError:
    """An ``OSError`` for a failed write that a library reported otherwise (ENOSPC when the disk is full)."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    code = errno.ENOSPC if free is not None and free < 64 * 2**20 else errno.EIO
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return OSError(code, f"{os.strerror(code)} ({lines[0][:200]})", str(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read and check one checkpoint file; raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a complete torch.save archive)")
    try:  # torch's reader does not check the members' CRC-32: a flipped bit would load silently
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint archive ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad}; a bit flipped on disk?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of every kind
        lines = str(exc).strip().splitlines() or [""]
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: "
                              f"{lines[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a padnet training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    missing = [k for k in ("epoch", "model", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    state["path"] = str(path)
    return state


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of ``run_dir`` (``None`` if there is none at all).

    A corrupt ``checkpoint.pt`` falls back to ``checkpoint.prev.pt`` with a
    warning; if every existing checkpoint is corrupt, raises
    :class:`CheckpointError` naming the files.
    """
    run_dir = Path(run_dir)
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint_file(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path} instead", stacklevel=2)
        return state
    if errors:
        raise CheckpointError("; ".join(errors))
    return None


__all__ = [
    "CHECKPOINT",
    "PREVIOUS",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_file",
    "rng_state",
    "set_rng_state",
    "model_bytes",
    "load_model_bytes",
    "mode_masks",
]
