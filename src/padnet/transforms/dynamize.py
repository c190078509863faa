"""``dynamize_``: swap static layers for PAD layers in place, chosen by target patterns.

Which modules *can* be converted is decided by the conversion registry
(:mod:`padnet.transforms.conversion`); this module resolves a
:class:`~padnet.transforms.config.PadConfig`'s targets to those sites, converts
them (reproducibly when ``cfg.seed`` is set) and records the step in the
model's transform record (:mod:`padnet.transforms.record`).

Default targets (no ``target_modules`` / ``target_types``), by structure only:
every FFN site if the model has any; otherwise every conv site except the
*stem* (the first conv in module order, the one the input reaches first) and a
conv *output head* (the last conv, when no ``nn.Linear`` or conv module is
registered after it: it produces the output, as in fully convolutional
classifiers).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .config import PadConfig
from .conversion import Site, find_sites, get_converter
from .record import get_state

__all__ = ["dynamize_", "select_targets", "name_matches", "default_targets"]


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """peft-style matching: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_output_head(model: nn.Module, name: str) -> bool:
    """Whether no Linear / conv module is registered after the module ``name``."""
    after = False
    for other, module in model.named_modules():
        if after and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return False
        if other == name:
            after = True
    return after


def default_targets(model: nn.Module, sites: list[Site]) -> list[Site]:
    """FFN sites if any, else conv sites without the stem and a conv output head (see module doc)."""
    ffn = [s for s in sites if s.target_type == "ffn"]
    if ffn:
        return ffn
    convs = [s for s in sites if s.target_type == "conv2d"]
    chosen = convs[1:]
    if chosen and _is_output_head(model, chosen[-1].name):
        chosen = chosen[:-1]
    return chosen


def select_targets(model: nn.Module, cfg: PadConfig) -> list[Site]:
    """Resolve ``cfg``'s targets to convertible sites; unknown or unmatched targets raise ``ValueError``."""
    sites = find_sites(model)
    names = [s.name for s in sites]
    if cfg.target_modules is None and cfg.target_types is None:
        chosen = default_targets(model, sites)
    else:
        chosen = list(sites)
        if cfg.target_types is not None:
            chosen = [s for s in chosen if s.target_type in cfg.target_types]
        if cfg.target_modules is not None:
            _check_targets_exist(model, cfg.target_modules, names)
            chosen = [s for s in chosen if name_matches(s.name, cfg.target_modules)]
    if cfg.exclude_modules is not None:
        chosen = [s for s in chosen if not name_matches(s.name, cfg.exclude_modules)]
    if not chosen:
        raise ValueError(
            f"no module matched targets (target_modules={cfg.target_modules!r}, "
            f"target_types={cfg.target_types!r}, exclude_modules={cfg.exclude_modules!r}); "
            f"convertible modules: {names or 'none'}"
        )
    return chosen


def _check_targets_exist(model: nn.Module, patterns: list[str] | str, site_names: list[str]) -> None:
    modules = dict(model.named_modules())
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in pattern_list:
        hits = [n for n in modules if name_matches(n, pattern if isinstance(patterns, str) else [pattern])]
        if not hits:
            raise ValueError(f"target {pattern!r} matched no module; convertible modules: {site_names}")
        convertible = [n for n in hits if n in site_names]
        if not convertible:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(
                f"target {pattern!r} matched {hits} of type {kinds}, which padnet cannot convert "
                f"(supported: nn.Conv2d, BERT-style FFN blocks, Sequential(Linear, act, Linear), and "
                f"whatever else is registered in padnet.transforms.conversion); "
                f"convertible modules: {site_names}"
            )


def dynamize_(model: nn.Module, cfg: PadConfig | None = None) -> nn.Module:
    """Swap the targets of ``cfg`` for PAD layers, in place; returns ``model``.

    Convs become :class:`DynamicConv2d` (weights seeded from the conv by
    default), FFNs become :class:`MoEFeedForward` (upcycled by default). Masks
    start all dynamic; :func:`padnet.partition_` then makes a share static.
    The step (with ``cfg``) is appended to the model's transform record
    (``model.padnet_state``), which :func:`padnet.save` writes and
    :func:`padnet.load` replays.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynamize_ expects an nn.Module, got {type(model).__name__}")
    cfg = cfg or PadConfig()
    if not isinstance(cfg, PadConfig):
        raise TypeError(f"dynamize_: cfg must be a PadConfig, got {type(cfg).__name__}")
    cfg.validate()
    state = get_state(model)
    if "compact" in state.ops():
        raise ValueError("dynamize_: the model is in deploy (compact) form; dynamize the model before compact_")
    sites = select_targets(model, cfg)
    seeded = torch.random.fork_rng(devices=[]) if cfg.seed is not None else contextlib.nullcontext()
    with seeded:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for site in sites:
            get_converter(site.converter).convert(model, site, cfg)
    state.append("dynamize", config=cfg.to_dict(), sites=[s.name for s in sites])
    return model
