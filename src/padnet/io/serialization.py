"""``padnet.save`` / ``padnet.load``: one safetensors file with a JSON header.

The file holds every tensor of ``model.state_dict()`` (masks included) and, in
the safetensors metadata under ``"padnet"``, a JSON document (format 2)::

    {"format_version": 2, "padnet_version": "...",
     "state": {...PadState: model spec + transform steps...},
     "dtype": "torch.float32" | null, "temperatures": {layer: float},
     "mask_keys": {"layer:group": state_dict key}, "extra": {...}}

``load`` rebuilds the architecture from the zoo spec (or takes the caller's
base model), replays the recorded transforms in order (``dynamize`` ->
``compact`` -> ``fold_bn``; see :mod:`padnet.transforms.record`), checks the
stored tensors against it and loads them. Untrusted files: the header is
validated before anything is built, the spec is first built on the ``meta``
device and checked against the shapes and total size of the stored tensors (a
header cannot make ``load`` allocate more than the file holds), mode masks
must hold only 0/1, and nothing is unpickled. Files written by padnet 0.1
(format 1: a flat ``pad_config`` and a ``compact`` flag) load too.

Writes go to a temporary file that is renamed into place (mode 0644), so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .._version import __version__
from ..layers.modes import PackedModeGroup, is_compact_layer, pad_layers, temperature_layers, validate_mask
from ..models import create_model
from ..transforms.compact import compact_
from ..transforms.config import PadConfig, migrate_v1
from ..transforms.dynamize import dynamize_, select_targets
from ..transforms.fold_bn import find_conv_bn_pairs, replay_fold_bn_
from ..transforms.record import (
    STATE_ATTRIBUTE, PadState, ReplayContext, find_state, get_check, get_replay, get_state, register_op,
)
# the modules that register the ops of later transforms ("gates", "harden_gates", "transition",
# "mode_scheduler"): a file that records them must load even if the caller never imported them
from ..transforms import gates as _gates, scheduler as _scheduler, transitions as _transitions  # noqa: F401

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
METADATA_KEY = "padnet"
FILE_MODE = 0o644
FLOAT_DTYPES = {"torch.float32": torch.float32, "torch.float64": torch.float64,
                "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}
MAX_SPEC_GROWTH = 64.0
"""Building a stored spec and replaying its record may allocate at most this many times the bytes of the
stored tensors (plus 1 MiB). Legitimate files stay far below: a compact file of K kernels needs about K + 1
times its size while its PAD form is rebuilt; a hostile header (a wider model, K = 10^6) is refused."""

__all__ = ["save", "load", "read_file", "read_metadata", "CheckpointError", "atomic_write", "FORMAT_VERSION"]


class CheckpointError(ValueError):
    """A padnet file is missing, corrupt, or does not fit the model."""


def atomic_write(path: str | Path, write, mode: int = FILE_MODE) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path`` (same directory), file mode ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------ writing


def _mask_keys(model: nn.Module) -> dict[str, str]:
    """``"layer:group" -> state_dict key`` of every mode mask (PAD or compact form)."""
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
    """Router temperatures of PAD layers and deploy forms that have one (a float, not in the state dict)."""
    return {n: float(m.temperature) for n, m in temperature_layers(model)}


def build_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    state = find_state(model) or PadState()
    dtypes = {str(p.dtype) for p in model.parameters()}
    return {
        "format_version": FORMAT_VERSION,
        "padnet_version": __version__,
        "state": state.to_dict(),
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "temperatures": _temperatures(model),
        "mask_keys": _mask_keys(model),
        "extra": extra or {},
    }


def save(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (weights, masks, transform record) to one ``.safetensors`` file, atomically (mode 0644)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"padnet.save expects an nn.Module, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"padnet.save: extra must be a dict, got {type(extra).__name__}")
    path = Path(path)
    meta = build_metadata(model, extra)
    try:
        header = json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"padnet.save: extra must be JSON-serialisable: {exc}") from None
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _check_no_sharing(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: header}))
    return path


def _check_no_sharing(tensors: dict[str, torch.Tensor]) -> None:
    by_ptr: dict[tuple[int, int], str] = {}
    for k, v in list(tensors.items()):
        key = (v.data_ptr(), v.numel())
        if v.numel() and key in by_ptr:
            tensors[k] = v.clone()  # tied weights: store both names, tie again on load_state_dict
        by_ptr.setdefault(key, k)


# ------------------------------------------------------------------------------ reading


def _raw_metadata(path: Path) -> tuple[dict[str, Any], Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such padnet file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without padnet metadata (not written by padnet.save)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: padnet metadata is not valid JSON ({exc})") from exc
    return _check_metadata(meta, path), raw


def _check_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """Validate the header's types (format 1 or 2); raises :class:`CheckpointError` naming the field."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: padnet metadata must be a JSON object")
    version = meta.get("format_version")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        raise CheckpointError(f"{path}: unsupported padnet format version {version!r}")
    dtype = meta.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in FLOAT_DTYPES):
        raise CheckpointError(f"{path}: metadata dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
    temps = meta.get("temperatures", {})
    if not isinstance(temps, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for k, v in temps.items()
    ):
        raise CheckpointError(f"{path}: metadata temperatures must map layer names to finite numbers > 0")
    masks = meta.get("mask_keys", {})
    if not isinstance(masks, dict) or not all(isinstance(k, str) and isinstance(v, str) and ":" in k
                                              for k, v in masks.items()):
        raise CheckpointError(f"{path}: metadata mask_keys must map 'layer:group' to tensor names")
    if not isinstance(meta.get("extra", {}), dict):
        raise CheckpointError(f"{path}: metadata extra must be a JSON object")
    try:
        meta["state"] = (_state_from_v1(meta) if version == 1 else PadState.from_dict(meta.get("state"))).to_dict()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad transform record: {exc}") from None
    return meta


def _state_from_v1(meta: dict[str, Any]) -> PadState:
    """The transform record a padnet 0.1 header implies (dynamize with its config, then compact if flagged)."""
    state = PadState()
    spec = meta.get("model")
    if spec is not None:
        state.model_spec = PadState.from_dict({"version": 1, "model_spec": spec}).model_spec
    cfg = meta.get("pad_config")
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise ValueError(f"pad_config must be an object, got {cfg!r}")
        state.append("dynamize", config=PadConfig.from_dict(migrate_v1(cfg)).to_dict())
    if meta.get("compact"):
        state.append("compact")
    return state


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated padnet header of a file (no tensors read); ``["state"]`` is the transform record."""
    return _raw_metadata(Path(path))[0]


def read_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return ``(metadata, tensors)`` of a padnet file, with errors naming the file."""
    path = Path(path)
    meta, _ = _raw_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({exc})") from exc
    return meta, tensors


def _check_dtype(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path) -> None:
    """The header's dtype (the parameters' dtype at save time) must be that of the stored parameters."""
    dtype = meta.get("dtype")
    if dtype is None:
        return
    stored = {str(tensors[k].dtype) for k, _ in model.named_parameters() if k in tensors}
    if stored and stored != {dtype}:
        raise CheckpointError(f"{path}: metadata dtype {dtype!r} does not match the stored parameters "
                              f"{sorted(stored)}")


# ------------------------------------------------------------------------------ rebuilding


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _SkipMetaInit(TorchFunctionMode):
    """While building on the ``meta`` device: in-place initialisers (``normal_``, ``zero_``, ...) are no-ops.

    Meta tensors hold no values, so nothing is lost; it keeps the check cheap
    (torch's reference ``normal_`` for meta tensors would import torch._dynamo).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def _replay_bytes(base: nn.Module, state: PadState, path) -> int:
    """Upper estimate of the bytes the recorded ``dynamize`` steps allocate on ``base`` (a meta model)."""
    total = 0
    for step in state.steps:
        if step.op != "dynamize":
            continue
        try:
            cfg = PadConfig.from_dict(step.params["config"])
            sites = select_targets(base, cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: the recorded dynamize step does not fit the model spec: {exc}") from None
        for site in sites:
            factors = cfg.conv.num_kernels if site.target_type == "conv2d" else cfg.moe.num_experts
            size = sum(p.numel() * p.element_size() for p in base.get_submodule(site.name).parameters())
            total += 2 * (factors + 1) * size  # factors + static copy (x2: an FFN block's second matrix)
        break  # later steps convert what is left: bounded by the same spec
    return total


def check_spec_fits(spec: dict[str, Any], tensors: dict[str, torch.Tensor], path,
                    state: PadState | None = None) -> None:
    """Build the spec's base model on the ``meta`` device (no memory) and check it against the file.

    Every tensor the base model shares with the file must have the stored shape,
    and the base model plus what the recorded ``dynamize`` steps would allocate on
    it (factors + static copy per converted site) may not exceed
    :data:`MAX_SPEC_GROWTH` times the stored bytes (plus 1 MiB): a header cannot
    make ``load`` allocate what the file does not hold.
    """
    try:
        with torch.device("meta"), _SkipMetaInit():
            base = create_model(spec["name"], **spec.get("kwargs", {}))
    except (TypeError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: the stored model spec {spec!r} cannot be built: {exc}") from exc
    stored = _nbytes(tensors.values())
    wanted = _nbytes(base.state_dict().values())
    if state is not None:
        wanted += _replay_bytes(base, state, path)
    if wanted > MAX_SPEC_GROWTH * stored + (1 << 20):
        raise CheckpointError(
            f"{path}: the stored model spec {spec['name']!r} describes {wanted / 2**20:.1f} MiB of weights but "
            f"the file holds {stored / 2**20:.1f} MiB; the header does not fit the tensors"
        )
    for key, t in base.state_dict().items():
        if key in tensors and tuple(tensors[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the file but the stored model "
                f"spec builds {tuple(t.shape)}; the header does not fit the tensors"
            )


def _set_masks_from_file(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path) -> None:
    """Before compacting a rebuilt PAD model: its masks from the file (the deploy form is built from them)."""
    layers = dict(pad_layers(model))
    for where, key in meta.get("mask_keys", {}).items():
        name, group = where.rsplit(":", 1)
        if name not in layers or key not in tensors:
            raise CheckpointError(f"{path}: mask {key!r} for layer {name!r} does not fit the model")
        live_key = key[: -len("mask")] + "live"  # packed live mask (pruned entries), if any
        try:
            if live_key in tensors:
                layers[name].set_modes(group, tensors[key], tensors[live_key])
            else:
                layers[name].set_mode_mask(group, tensors[key])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: mask {key!r} of layer {name!r}: {exc}") from None


def _replays(op: str) -> bool:
    return get_replay(op) is not None


def _already_applied(model: nn.Module, steps: list[dict[str, Any]]) -> int:
    """How many leading architecture steps of the file the caller's model already has."""
    own = find_state(model)
    if own is not None and own.steps:
        mine = [s.to_dict() for s in own.steps if _replays(s.op)]
        theirs = [s for s in steps if _replays(s["op"])]
        if [s["op"] for s in mine] != [s["op"] for s in theirs[: len(mine)]]:
            raise CheckpointError(f"the given model was transformed {[s['op'] for s in mine]} but the file "
                                  f"records {[s['op'] for s in theirs]}")
        return len(mine)
    if any(True for _ in pad_layers(model)):  # dynamized without a record (hand-built): skip dynamize steps
        return sum(1 for s in steps if s["op"] == "dynamize")
    return 0


def _replay_dynamize(model: nn.Module, params: dict[str, Any], ctx: ReplayContext) -> None:
    dynamize_(model, PadConfig.from_dict(params["config"]))
    sites = params.get("sites")
    got = get_state(model).steps[-1].params["sites"]
    if sites is not None and got != sites:
        raise CheckpointError(f"{ctx.source}: replaying dynamize converted {got}, the file records {sites}")


def _replay_compact(model: nn.Module, params: dict[str, Any], ctx: ReplayContext) -> None:
    _set_masks_from_file(model, ctx.metadata, ctx.tensors, ctx.source)
    compact_(model)


def _replay_fold_bn(model: nn.Module, params: dict[str, Any], ctx: ReplayContext) -> None:
    replay_fold_bn_(model, params.get("pairs", []))


register_op("dynamize", _replay_dynamize)
register_op("compact", _replay_compact)
register_op("fold_bn", _replay_fold_bn)


def rebuild(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None, path) -> nn.Module:
    """Architecture from the transform record: zoo spec (or the given base model), then the recorded transforms."""
    state = PadState.from_dict(meta["state"])
    ctx = ReplayContext(tensors=tensors, metadata=meta, source=str(path))
    for i, step in enumerate(state.steps):  # every recorded step against the file, before anything is built
        check = get_check(step.op)
        if check is None:
            continue
        try:
            check(step.params, dataclasses.replace(ctx, index=i))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: recorded step {i} ({step.op!r}) does not fit the file: {exc}") from None
    if model is None:
        spec = state.model_spec
        if not spec:
            raise CheckpointError(f"{path}: no model spec stored; pass the base model: padnet.load(path, model=...)")
        check_spec_fits(spec, tensors, path, state)
        model = create_model(spec["name"], **spec.get("kwargs", {}))
    elif not isinstance(model, nn.Module):
        raise TypeError(f"padnet.load: model must be an nn.Module or None, got {type(model).__name__}")
    if meta.get("dtype"):
        model.to(FLOAT_DTYPES[meta["dtype"]])
    steps = [s.to_dict() for s in state.steps]
    skip = _already_applied(model, steps)
    done = 0
    try:
        for i, step in enumerate(steps):
            replay = get_replay(step["op"])
            if replay is None:
                continue
            done += 1
            if done > skip:
                replay(model, step["params"], dataclasses.replace(ctx, index=i))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot replay the recorded transforms: {exc}") from exc
    if meta.get("format_version") == 1 and state.last("compact") is not None:
        _replay_v1_fold(model, tensors)
    return model


def _replay_v1_fold(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """padnet 0.1 did not record BatchNorm folding: BatchNorms after compact convs missing from the file were folded."""
    folded = [[c, b] for c, b in find_conv_bn_pairs(model) if f"{b}.running_mean" not in tensors]
    if folded:
        replay_fold_bn_(model, folded)


def _check_masks(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Every stored mode mask holds only 0/1 (as ``set_mode_mask`` requires) before it is loaded."""
    for where, key in _mask_keys(model).items():
        if key not in tensors:
            continue  # load_state_dict reports the missing key
        t = tensors[key]
        try:
            validate_mask(t, t.shape, where)
        except ValueError as exc:
            raise CheckpointError(f"{path}: mode mask {key!r}: {exc}") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: mode mask {key!r} holds NaN/inf")


def load(path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save`.

    With ``model=None`` the architecture is rebuilt from the stored zoo spec;
    otherwise ``model`` (the static base model, or one already transformed the
    same way) receives the weights. The recorded transforms are replayed in
    order, so every combination of ``dynamize_``, ``partition_``, ``compact_``
    and ``fold_bn`` round-trips exactly. A corrupt, hostile or mismatched file
    raises :class:`CheckpointError` naming the file and the problem.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"padnet.load: model must be an nn.Module or None, got {type(model).__name__}")
    try:  # checked before reading anything
        map_location = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"padnet.load: map_location {map_location!r} is not a device ({exc})") from None
    meta, tensors = read_file(path)
    model = rebuild(meta, tensors, model, path)
    _check_dtype(model, meta, tensors, path)
    _check_masks(model, tensors, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from exc
    for name, temperature in meta.get("temperatures", {}).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: temperature for {name!r}, which is not a layer of the model") from None
        if not isinstance(getattr(type(layer), "temperature", None), property):
            raise CheckpointError(f"{path}: temperature for {name!r}, a {type(layer).__name__} without one")
        layer.temperature = temperature
    state = PadState.from_dict(meta["state"])
    if meta.get("format_version") == 1:  # the record the replay wrote (it also knows the v1 BN folds)
        state = PadState.from_dict({**get_state(model).to_dict(), "model_spec": state.model_spec})
    if state.model_spec is None:
        own = find_state(model)
        state.model_spec = own.model_spec if own is not None else None
    model.__dict__[STATE_ATTRIBUTE] = state
    return model.to(map_location)
