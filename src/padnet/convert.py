"""Target matching and ``dynamize_``: swap static layers for PAD layers in place."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import PadConfig
from .layers.dynamic_conv import DynamicConv2d
from .layers.modes import is_compact_layer, is_pad_layer

CLASSIFIER_NAMES = ("fc", "classifier", "head")


@dataclass(frozen=True)
class Candidate:
    """A convertible site: ``kind`` is ``"conv2d"``, ``"bert_ffn"`` or ``"seq_ffn"``."""

    name: str
    kind: str

    @property
    def target_type(self) -> str:
        return "conv2d" if self.kind == "conv2d" else "ffn"


def _is_bert_ffn(module: nn.Module) -> bool:
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    return (
        isinstance(getattr(inter, "dense", None), nn.Linear)
        and isinstance(getattr(out, "dense", None), nn.Linear)
        and inter.dense.out_features == out.dense.in_features
        and inter.dense.in_features == out.dense.out_features
    )


def _seq_ffn_parts(module: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear, nn.Module | None] | None:
    """``(fc_in, act, fc_out, trailing_dropout)`` for ``Sequential(Linear, act, Linear[, Dropout])``."""
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module)
    dropout = None
    if children and isinstance(children[-1], nn.Dropout):
        dropout = children.pop()
    if len(children) != 3:
        return None
    fc_in, act, fc_out = children
    if not (isinstance(fc_in, nn.Linear) and isinstance(fc_out, nn.Linear)):
        return None
    if isinstance(act, (nn.Linear, nn.Dropout)) or fc_in.out_features != fc_out.in_features:
        return None
    if fc_in.in_features != fc_out.out_features:
        return None
    return fc_in, act, fc_out, dropout


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every site ``dynamize_`` can convert, in module order."""
    found: list[Candidate] = []
    for name, module in model.named_modules():
        if is_pad_layer(module) or is_compact_layer(module):
            continue
        if type(module) is nn.Conv2d:
            found.append(Candidate(name, "conv2d"))
        elif _is_bert_ffn(module):
            found.append(Candidate(f"{name}.intermediate" if name else "intermediate", "bert_ffn"))
        elif _seq_ffn_parts(module) is not None:
            found.append(Candidate(name, "seq_ffn"))
    return found


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """peft-style matching: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _default_targets(candidates: list[Candidate]) -> list[Candidate]:
    ffn = [c for c in candidates if c.target_type == "ffn"]
    if ffn:
        return ffn
    convs = [c for c in candidates if c.kind == "conv2d"]
    return [
        c for i, c in enumerate(convs)
        if i > 0 and c.name.split(".")[0] not in CLASSIFIER_NAMES
    ]


def select_targets(model: nn.Module, cfg: PadConfig) -> list[Candidate]:
    """Resolve ``cfg``'s targets to candidate sites; unknown or unmatched targets raise ``ValueError``."""
    candidates = find_candidates(model)
    names = [c.name for c in candidates]
    if cfg.target_modules is None and cfg.target_types is None:
        chosen = _default_targets(candidates)
    else:
        chosen = list(candidates)
        if cfg.target_types is not None:
            chosen = [c for c in chosen if c.target_type in cfg.target_types]
        if cfg.target_modules is not None:
            _check_targets_exist(model, cfg.target_modules, names)
            chosen = [c for c in chosen if name_matches(c.name, cfg.target_modules)]
    if cfg.exclude_modules is not None:
        chosen = [c for c in chosen if not name_matches(c.name, cfg.exclude_modules)]
    if not chosen:
        raise ValueError(
            f"no module matched targets (target_modules={cfg.target_modules!r}, "
            f"target_types={cfg.target_types!r}, exclude_modules={cfg.exclude_modules!r}); "
            f"convertible modules: {names or 'none'}"
        )
    return chosen


def _check_targets_exist(model: nn.Module, patterns: list[str] | str, candidate_names: list[str]) -> None:
    modules = dict(model.named_modules())
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in pattern_list:
        hits = [n for n in modules if name_matches(n, pattern if isinstance(patterns, str) else [pattern])]
        if not hits:
            raise ValueError(f"target {pattern!r} matched no module; convertible modules: {candidate_names}")
        convertible = [n for n in hits if n in candidate_names]
        if not convertible:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(
                f"target {pattern!r} matched {hits} of type {kinds}, which padnet cannot convert "
                f"(supported: nn.Conv2d, BERT-style FFN blocks, Sequential(Linear, act, Linear)); "
                f"convertible modules: {candidate_names}"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _moe_from_linears(fc_in: nn.Linear, fc_out: nn.Linear, act: nn.Module, cfg: PadConfig) -> nn.Module:
    from .layers.moe import MoEFeedForward

    return MoEFeedForward.from_dense(
        fc_in, fc_out, num_experts=cfg.num_experts, top_k=cfg.top_k, activation=act, init=cfg.moe_init,
        noise_std=cfg.noise_std, scale=cfg.scale, aux_loss_coef=cfg.aux_loss_coef,
    )


def _convert(model: nn.Module, site: Candidate, cfg: PadConfig) -> None:
    if site.kind == "conv2d":
        module = model.get_submodule(site.name)
        new = DynamicConv2d.from_conv(
            module, num_kernels=cfg.num_kernels, init=cfg.init, noise_std=cfg.noise_std,
            reduction=cfg.reduction, temperature=cfg.temperature, routing=cfg.routing, scale=cfg.scale,
            backend=cfg.backend, router_init=cfg.router_init,
        )
        new.train(module.training)
        _set_submodule(model, site.name, new)
    elif site.kind == "bert_ffn":
        parent_name = site.name.rpartition(".")[0]
        block = model.get_submodule(parent_name) if parent_name else model
        inter, out = block.intermediate, block.output
        act = getattr(inter, "intermediate_act_fn", None) or nn.GELU()
        moe = _moe_from_linears(inter.dense, out.dense, act, cfg)
        # BertLayer calls output(intermediate(h), h): the MoE yields the FFN output, so the
        # output block keeps only its dropout + residual LayerNorm.
        moe.train(inter.training)
        block.intermediate = moe
        out.dense = nn.Identity()
    else:
        module = model.get_submodule(site.name)
        fc_in, act, fc_out, dropout = _seq_ffn_parts(module)
        moe = _moe_from_linears(fc_in, fc_out, act, cfg).train(module.training)
        _set_submodule(model, site.name, moe if dropout is None else nn.Sequential(moe, dropout))


def dynamize_(model: nn.Module, cfg: PadConfig | None = None) -> nn.Module:
    """Swap the targets of ``cfg`` for PAD layers, in place; returns ``model``.

    Convs become :class:`DynamicConv2d` (weights seeded from the conv by
    default), FFNs become :class:`MoEFeedForward` (upcycled by default). Masks
    start all dynamic; :func:`padnet.partition_` then makes a ratio static.
    ``model.padnet_config`` records ``cfg`` for saving.
    """
    cfg = cfg or PadConfig()
    cfg.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynamize_ expects an nn.Module, got {type(model).__name__}")
    sites = select_targets(model, cfg)
    seeded = torch.random.fork_rng(devices=[]) if cfg.seed is not None else contextlib.nullcontext()
    with seeded:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for site in sites:
            _convert(model, site, cfg)
    model.padnet_config = cfg
    return model
