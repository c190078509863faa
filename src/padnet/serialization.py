"""``padnet.save`` / ``padnet.load``: one safetensors file with a JSON header.

The file holds every tensor of ``model.state_dict()`` (masks included) and, in
the safetensors metadata under ``"padnet"``, a JSON document: the zoo model
spec (to rebuild the architecture), the :class:`PadConfig`, whether the model
is in deploy (compact) form, per-layer temperatures and where each mode mask
lives. Writes go to a temporary file that is renamed into place, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import PadConfig
from .layers.modes import PackedModeGroup, is_compact_layer, pad_layers

FORMAT_VERSION = 1
METADATA_KEY = "padnet"


class CheckpointError(ValueError):
    """A padnet file is missing, corrupt, or does not fit the model."""


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path`` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mask_keys(model: nn.Module) -> dict[str, str]:
    """``"layer.group" -> state_dict key`` of every mode mask (PAD or compact form)."""
    keys: dict[str, str] = {}
    for name, layer in pad_layers(model):
        prefix = f"{name}." if name else ""
        buffers = {id(b): k for k, b in layer.named_buffers()}
        for g in layer.mode_groups():
            keys[f"{name}:{g.name}"] = prefix + buffers[id(g.mask)]
    for name, module in model.named_modules():
        if is_compact_layer(module):
            for child, packed in module.named_children():
                if isinstance(packed, PackedModeGroup):
                    keys[f"{name}:{packed.group_name}"] = f"{name}.{child}.mask" if name else f"{child}.mask"
    return keys


def _temperatures(model: nn.Module) -> dict[str, float]:
    return {n: float(m.temperature) for n, m in model.named_modules() if hasattr(m, "_temperature")}


def build_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = getattr(model, "padnet_config", None)
    dtypes = {str(p.dtype) for p in model.parameters()}
    return {
        "format_version": FORMAT_VERSION,
        "padnet_version": __version__,
        "model": getattr(model, "padnet_model_spec", None),
        "pad_config": cfg.to_dict() if cfg is not None else None,
        "compact": bool(getattr(model, "padnet_compact", False)),
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "temperatures": _temperatures(model),
        "mask_keys": _mask_keys(model),
        "extra": extra or {},
    }


def save(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (weights, masks, config) to one ``.safetensors`` file, atomically."""
    path = Path(path)
    meta = build_metadata(model, extra)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _check_no_sharing(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))
    return path


def _check_no_sharing(tensors: dict[str, torch.Tensor]) -> None:
    by_ptr: dict[tuple[int, int], str] = {}
    for k, v in list(tensors.items()):
        key = (v.data_ptr(), v.numel())
        if v.numel() and key in by_ptr:
            tensors[k] = v.clone()  # tied weights: store both names, tie again on load_state_dict
        by_ptr.setdefault(key, k)


def read_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return ``(metadata, tensors)`` of a padnet file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such padnet file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without padnet metadata (not written by padnet.save)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: padnet metadata is not valid JSON ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported padnet format version {meta.get('format_version')!r}")
    return meta, tensors


def rebuild(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None, path) -> nn.Module:
    """Architecture from metadata (zoo spec or the given base model), dynamized and compacted as saved."""
    from .convert import dynamize_
    from .export.compact import compact_

    if model is None:
        spec = meta.get("model")
        if not spec:
            raise CheckpointError(f"{path}: no model spec stored; pass the base model: padnet.load(path, model=...)")
        from .models import create_model

        model = create_model(spec["name"], **spec.get("kwargs", {}))
    if meta.get("dtype"):
        model.to(getattr(torch, meta["dtype"].removeprefix("torch.")))
    if meta.get("pad_config") is not None and not any(True for _ in pad_layers(model)):
        dynamize_(model, PadConfig.from_dict(meta["pad_config"]))
    if meta.get("compact"):
        layers = dict(pad_layers(model))
        for where, key in meta.get("mask_keys", {}).items():
            name, group = where.rsplit(":", 1)
            if name not in layers or key not in tensors:
                raise CheckpointError(f"{path}: mask {key!r} for layer {name!r} does not fit the model")
            live_key = key[: -len("mask")] + "live"  # packed live mask (pruned entries), if any
            if live_key in tensors:
                layers[name].set_modes(group, tensors[key], tensors[live_key])
            else:
                layers[name].set_mode_mask(group, tensors[key])
        compact_(model)
    return model


def load(path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save`.

    With ``model=None`` the architecture is rebuilt from the stored zoo spec;
    otherwise ``model`` (the static base model, or one already dynamized the
    same way) receives the weights. Exact round trip; a corrupt or mismatched
    file raises :class:`CheckpointError` naming the file and the problem.
    """
    meta, tensors = read_file(path)
    model = rebuild(meta, tensors, model, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from exc
    for name, temperature in meta.get("temperatures", {}).items():
        model.get_submodule(name).temperature = temperature
    if meta.get("pad_config") is not None:
        model.padnet_config = PadConfig.from_dict(meta["pad_config"])
    model.padnet_metadata = meta.get("extra", {})
    return model.to(map_location)
