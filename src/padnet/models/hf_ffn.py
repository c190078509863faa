"""Feed-forward blocks of Hugging Face transformers (and look-alikes), found by structure.

An FFN block is a module whose direct children are two or three projections
and one activation:

- plain: ``in: H -> I``, activation, ``out: I -> H`` (DistilBERT ``lin1``/``lin2``,
  ViT / DeiT ``fc1``/``fc2``, GPT-2 ``c_fc``/``c_proj`` as ``Conv1D``, GPT-J
  ``fc_in``/``fc_out``, T5 ``DenseReluDense`` ``wi``/``wo``);
- gated: two ``H -> I`` projections (gate and up), activation, ``out: I -> H``:
  ``out(act(gate(x)) * up(x))`` (LLaMA / Mistral / Qwen ``gate_proj`` /
  ``up_proj`` / ``down_proj``, T5 v1.1 ``wi_0`` / ``wi_1`` / ``wo``).

A projection is an ``nn.Linear`` or a ``Conv1D``-style layer (``weight`` stored
transposed, ``[in, out]``, with an ``nf`` attribute = out features, as in
GPT-2). Nothing is matched by model or class name: the roles (which projection
is in / gate / up / out) come from the weight shapes, and are then *verified*
by running the block once on a small random probe (eval mode, no gradient;
on the ``meta`` device, where there are no values, the shapes alone decide)
and checking that the reconstruction ``out(act(in(x)))`` (or the gated form)
reproduces the block's own output -- a block that does something else
(scaling, residuals, extra terms) is not matched. The probe also tells where
the block's dropout sits: a dropout on the block's output is kept after the
MoE layer; a dropout on the hidden activations (T5) has no place in an MoE
expert and is dropped (it only acts in training). BERT-style FFNs split over
two sibling modules (``intermediate`` + ``output`` with its residual
LayerNorm: BERT, RoBERTa, ELECTRA, MiniLM) are handled by the BERT surgery of
:mod:`padnet.models.bert` / the core converter.

Anything else is named with :class:`FFNMapping` (the names of the in / gate /
out projections and, optionally, the activation).

Functions here are pure (they read modules, build new ones, and
:func:`convert_ffn` swaps one in); the conversion registry calls them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..layers.modes import is_compact_layer, is_pad_layer
from ..layers.moe import MoEFeedForward
from ..transforms.conversion import Converter, Site, moe_options, register_converter, swap_module, unregister_converter

__all__ = [
    "FFNSite",
    "FFNMapping",
    "match_ffn",
    "match_mapped_ffn",
    "find_ffn_sites",
    "build_moe",
    "convert_ffn",
    "is_projection",
    "as_linear",
    "register_ffn_mapping",
    "unregister_ffn_mapping",
    "HF_FFN",
]

_PROBE_TOKENS = 6
_PROBE_RTOL = 1e-4


# ----------------------------------------------------------------------------- projections


def is_projection(module: nn.Module) -> bool:
    """``nn.Linear`` or a Conv1D-style layer (``weight [in, out]``, ``nf == out``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and isinstance(nf, int) and weight.shape[1] == nf


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def as_linear(module: nn.Module) -> nn.Linear:
    """The projection as an ``nn.Linear`` (same object for a Linear; a transposed copy of a Conv1D)."""
    if isinstance(module, nn.Linear):
        return module
    fin, fout = _features(module)
    bias = getattr(module, "bias", None)
    lin = nn.Linear(fin, fout, bias=bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(module.weight.detach().t())
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin


def _is_activation(module: nn.Module) -> bool:
    return (
        not is_projection(module)
        and not isinstance(module, (nn.Dropout, nn.Identity))
        and next(module.parameters(), None) is None
        and next(module.children(), None) is None
    )


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class FFNSite:
    """A convertible FFN block.

    Attributes:
        name: qualified name of the block in the model.
        in_proj: child name of the input projection (the *up* projection when gated).
        out_proj: child name of the output projection.
        gate_proj: child name of the gate projection, or ``None`` (plain FFN).
        activation: child name of the activation module, or ``None`` when
            ``activation_fn`` is given (mapping with an explicit activation).
        output_dropout: child name of a dropout applied to the block's output (kept).
        hidden_dropout: child name of a dropout on the hidden activations (dropped).
        hidden_size, intermediate_size: ``H`` and ``I``.
    """

    name: str
    in_proj: str
    out_proj: str
    gate_proj: str | None
    activation: str | None
    hidden_size: int
    intermediate_size: int
    output_dropout: str | None = None
    hidden_dropout: str | None = None
    activation_fn: Any = field(default=None, compare=False, repr=False)

    @property
    def gated(self) -> bool:
        return self.gate_proj is not None

    @property
    def kind(self) -> str:
        return "gated_ffn" if self.gated else "ffn"


@dataclass(frozen=True)
class FFNMapping:
    """Names of an FFN block's projections, for blocks the structural matcher does not know.

    ``in_proj`` (the up projection when gated), ``out_proj`` and optionally
    ``gate_proj`` are child module names (dotted paths below the block are
    allowed); ``activation`` is a child name, an activation name understood by
    :func:`padnet.layers.moe.resolve_activation` (``"silu"``, ``"gelu"``, ...)
    or a callable; ``None`` means the block's single parameter-free child.
    The mapped block must compute ``out(act(in(x)))`` or
    ``out(act(gate(x)) * in(x))``; this is verified on a probe.
    """

    in_proj: str
    out_proj: str
    gate_proj: str | None = None
    activation: Any = None

    def names(self) -> list[str]:
        return [n for n in (self.in_proj, self.gate_proj, self.out_proj) if n is not None]

    def __post_init__(self) -> None:
        for label in ("in_proj", "out_proj", "gate_proj"):
            value = getattr(self, label)
            if value is None and label == "gate_proj":
                continue
            if not isinstance(value, str) or not value:
                raise TypeError(f"FFNMapping.{label} must be a non-empty module name, got {value!r}")
        if len(set(self.names())) != len(self.names()):
            raise ValueError(f"FFNMapping names the same module twice: {self.names()}")


def _probe_output(module: nn.Module, x: Tensor, dropouts: dict[str, nn.Module]) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``module(x)`` in eval mode without gradient; returns the output and each dropout's input."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, drop in dropouts.items():
        handles.append(drop.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0])))
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
    if not isinstance(y, Tensor):
        raise TypeError("the block does not return a tensor")
    return y, seen


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= _PROBE_RTOL * max(scale, 1e-12)


def _resolve(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _verify(
    block_name: str,
    block: nn.Module,
    projections: dict[str, nn.Module],
    in_name: str,
    gate_candidates: list[tuple[str | None, str]],
    out_name: str,
    act: Callable[[Tensor], Tensor],
) -> tuple[str | None, str, dict[str, Tensor], Tensor] | None:
    """Probe the block; return ``(gate, up, dropout_inputs, y)`` for the role assignment that reproduces it."""
    p_in = projections[in_name]
    h = _features(p_in)[0]
    weight = p_in.weight
    if weight.is_meta:  # no values to probe (load's size check builds models on "meta"): shapes only
        gate_name, up_name = gate_candidates[0]
        return gate_name, up_name, {}, None
    if not weight.is_floating_point():
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, _PROBE_TOKENS // 2, h, generator=gen).to(device=weight.device, dtype=weight.dtype)
    dropouts = {n: m for n, m in block.named_children() if isinstance(m, nn.Dropout)}
    try:
        y, seen = _probe_output(block, x, dropouts)
    except Exception:  # the block needs other arguments or fails on a probe: not an FFN we can swap
        return None
    out = projections[out_name]
    with torch.no_grad():
        for gate_name, up_name in gate_candidates:
            up = projections[up_name](x)
            hidden = act(up) if gate_name is None else act(projections[gate_name](x)) * up
            if _close(out(hidden), y):
                return gate_name, up_name, seen, y
    return None


def _dropout_roles(seen: dict[str, Tensor], y: Tensor | None) -> tuple[str | None, str | None]:
    output_dropout = hidden_dropout = None
    if y is None:
        return None, None
    for name, inp in seen.items():
        if inp.shape == y.shape and _close(inp, y):
            output_dropout = name
        else:
            hidden_dropout = name
    return output_dropout, hidden_dropout


def match_ffn(name: str, module: nn.Module) -> FFNSite | None:
    """Structural FFN matcher: a site for a plain or gated FFN block, else ``None``.

    ``nn.Sequential`` blocks, PAD layers and deploy forms are left to other
    converters (``None``).
    """
    if isinstance(module, nn.Sequential) or is_pad_layer(module) or is_compact_layer(module):
        return None
    children = dict(module.named_children())
    projections = {n: m for n, m in children.items() if is_projection(m)}
    activations = [n for n, m in children.items() if _is_activation(m)]
    if len(projections) not in (2, 3) or len(activations) != 1:
        return None
    others = [n for n, m in children.items() if n not in projections and n not in activations
              and not isinstance(m, (nn.Dropout, nn.Identity))]
    if others:
        return None
    shapes = {n: _features(m) for n, m in projections.items()}
    # out: the projection whose input is I and output H; ins: H -> I
    for out_name, (i_out, h_out) in shapes.items():
        ins = [n for n, (fi, fo) in shapes.items() if n != out_name and (fi, fo) == (h_out, i_out)]
        if len(ins) != len(projections) - 1:
            continue
        if len(ins) == 1:
            candidates = [(None, ins[0])]
        else:
            a, b = ins
            candidates = [(a, b), (b, a)]
        act = children[activations[0]]
        found = _verify(name, module, projections, ins[0], candidates, out_name, act)
        if found is None:
            continue
        gate_name, up_name, seen, y = found
        output_dropout, hidden_dropout = _dropout_roles(seen, y)
        return FFNSite(name, up_name, out_name, gate_name, activations[0], h_out, i_out,
                       output_dropout, hidden_dropout)
    return None


def match_mapped_ffn(name: str, module: nn.Module, mapping: FFNMapping, *, strict: bool = False) -> FFNSite | None:
    """A site for ``module`` under a user mapping, ``None`` if the named children are absent.

    ``strict=True`` (the module was targeted by name) turns every mismatch into
    a ``ValueError`` naming the module and the problem: missing projections,
    shapes that disagree, no activation, or a block whose output the mapping
    does not reproduce.
    """
    where = f"FFN mapping on {name!r} ({type(module).__name__})"
    resolved = {n: _resolve(module, n) for n in mapping.names()}
    missing = [n for n, m in resolved.items() if m is None]
    if missing:
        if strict:
            children = [n for n, _ in module.named_children()]
            raise ValueError(f"{where}: no submodule {missing} (children: {children})")
        return None
    not_proj = [n for n, m in resolved.items() if not is_projection(m)]
    if not_proj:
        raise ValueError(f"{where}: {not_proj} are not projections (nn.Linear or Conv1D), got "
                         f"{[type(resolved[n]).__name__ for n in not_proj]}")
    h, i = _features(resolved[mapping.in_proj])
    expect = {mapping.in_proj: (h, i), mapping.out_proj: (i, h)}
    if mapping.gate_proj is not None:
        expect[mapping.gate_proj] = (h, i)
    for n, shape in expect.items():
        if _features(resolved[n]) != shape:
            raise ValueError(
                f"{where}: projection shapes disagree: {n!r} is {_features(resolved[n])[0]} -> "
                f"{_features(resolved[n])[1]}, expected {shape[0]} -> {shape[1]} (in_proj "
                f"{mapping.in_proj!r} is {h} -> {i})"
            )
    act_name, act_fn = _mapping_activation(where, module, mapping)
    act = act_fn if act_fn is not None else module.get_submodule(act_name)
    gate = [(mapping.gate_proj, mapping.in_proj)]
    found = _verify(name, module, resolved, mapping.in_proj, gate, mapping.out_proj, act)
    if found is None:
        raise ValueError(
            f"{where}: the block's output is not {'out(act(gate(x)) * in(x))' if mapping.gate_proj else 'out(act(in(x)))'}"
            f" with in={mapping.in_proj!r}, gate={mapping.gate_proj!r}, out={mapping.out_proj!r}; check the names "
            "(and the activation)"
        )
    _, _, seen, y = found
    output_dropout, hidden_dropout = _dropout_roles(seen, y)
    return FFNSite(name, mapping.in_proj, mapping.out_proj, mapping.gate_proj, act_name, h, i,
                   output_dropout, hidden_dropout, activation_fn=act_fn)


def _mapping_activation(where: str, module: nn.Module, mapping: FFNMapping) -> tuple[str | None, Any]:
    act = mapping.activation
    if act is None:
        acts = [n for n, m in module.named_children() if _is_activation(m)]
        if len(acts) != 1:
            raise ValueError(f"{where}: cannot tell the activation ({len(acts)} parameter-free children: {acts}); "
                             "pass FFNMapping(activation=...)")
        return acts[0], None
    if isinstance(act, str):
        sub = _resolve(module, act)
        if sub is not None:
            return act, None
        from ..layers.moe import resolve_activation

        try:
            return None, resolve_activation(act)[0]
        except ValueError as exc:
            raise ValueError(f"{where}: activation {act!r} is neither a child module nor a known activation") from exc
    if callable(act):
        return None, act
    raise TypeError(f"{where}: activation must be a name or a callable, got {type(act).__name__}")


def find_ffn_sites(model: nn.Module, mapping: FFNMapping | None = None) -> list[FFNSite]:
    """Every FFN block of ``model`` in module order (structural matcher, or ``mapping`` when given).

    With a ``mapping`` that matches no block, ``ValueError`` names the mapping.
    """
    sites = []
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and any(name.startswith(p) for p in skip):
            continue
        site = match_ffn(name, module) if mapping is None else match_mapped_ffn(name, module, mapping)
        if site is not None:
            sites.append(site)
            skip += (f"{name}.",)
    if mapping is not None and not sites:
        raise ValueError(f"{mapping} matched no module of the model: no module has children named "
                         f"{mapping.names()}")
    return sites


# ----------------------------------------------------------------------------- conversion


def build_moe(block: nn.Module, site: FFNSite, **options: Any) -> nn.Module:
    """The MoE replacement of ``block`` (its output dropout, if any, follows it in a Sequential)."""
    fc_in = as_linear(block.get_submodule(site.in_proj))
    fc_out = as_linear(block.get_submodule(site.out_proj))
    fc_gate = as_linear(block.get_submodule(site.gate_proj)) if site.gate_proj else None
    if site.activation_fn is not None:
        act = site.activation_fn
    else:
        act = copy.deepcopy(block.get_submodule(site.activation))
    moe = MoEFeedForward.from_dense(fc_in, fc_out, activation=act, fc_gate=fc_gate, name=site.name, **options)
    moe.train(block.training)
    if site.output_dropout is not None:
        return nn.Sequential(moe, copy.deepcopy(block.get_submodule(site.output_dropout)))
    return moe


def convert_ffn(model: nn.Module, site: FFNSite, **options: Any) -> nn.Module:
    """Replace the block at ``site`` by its MoE form (:func:`build_moe`); returns the new module."""
    block = model.get_submodule(site.name) if site.name else model
    if not site.name:
        raise ValueError("convert_ffn: the model itself is the FFN block; wrap it or call build_moe(block, site)")
    new = build_moe(block, site, **options)
    parent_name, _, child = site.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new


# ----------------------------------------------------------------------------- registry


def _match_hf_ffn(name: str, module: nn.Module) -> Site | None:
    return HF_FFN.site(name) if name and match_ffn(name, module) is not None else None


def _convert_hf_ffn(model: nn.Module, site: Site, cfg) -> None:
    block = model.get_submodule(site.name)
    ffn = match_ffn(site.name, block)
    if ffn is None:  # the block changed between matching and conversion
        raise ValueError(f"FFN {site.name!r} ({type(block).__name__}) no longer matches the FFN structure")
    swap_module(model, site.name, build_moe(block, ffn, **moe_options(cfg.moe)))


# The generic structural matcher is the fallback: any converter registered with the default
# priority (0) or higher, e.g. for a family's own surgery, is tried first.
HF_FFN = register_converter(Converter("hf_ffn", "ffn", _match_hf_ffn, _convert_hf_ffn), priority=-10)


def _mapping_converter_name(mapping: FFNMapping) -> str:
    return f"ffn_mapping[{mapping.in_proj},{mapping.gate_proj},{mapping.out_proj}]"


def register_ffn_mapping(mapping: FFNMapping, *, name: str | None = None, priority: int = 20) -> Converter:
    """Register a converter for FFN blocks named by ``mapping`` (tried before the built-in matchers).

    A module that has *some* but not all of the mapped children, projections
    whose shapes disagree, or a block whose output the mapping does not
    reproduce raises ``ValueError`` naming the module when
    :func:`padnet.dynamize_` searches the model. Modules with none of the
    names are left to the other converters. Like every registered converter,
    the registration must be repeated in a new process before
    :func:`padnet.load` rebuilds such a model.
    """
    if not isinstance(mapping, FFNMapping):
        raise TypeError(f"register_ffn_mapping expects an FFNMapping, got {type(mapping).__name__}")
    conv_name = name or _mapping_converter_name(mapping)

    def match(qualified: str, module: nn.Module) -> Site | None:
        if not qualified or isinstance(module, nn.Sequential) or is_pad_layer(module) or is_compact_layer(module):
            return None
        present = [n for n in mapping.names() if _resolve(module, n) is not None]
        if not present:
            return None
        if len(present) != len(mapping.names()):
            match_mapped_ffn(qualified, module, mapping, strict=True)  # raises naming the missing children
        site = match_mapped_ffn(qualified, module, mapping, strict=True)
        return converter.site(qualified) if site is not None else None

    def convert(model: nn.Module, site: Site, cfg) -> None:
        block = model.get_submodule(site.name)
        ffn = match_mapped_ffn(site.name, block, mapping, strict=True)
        swap_module(model, site.name, build_moe(block, ffn, **moe_options(cfg.moe)))

    converter = Converter(conv_name, "ffn", match, convert)
    return register_converter(converter, priority=priority)


def unregister_ffn_mapping(mapping_or_name: FFNMapping | str) -> None:
    """Remove a mapping registered with :func:`register_ffn_mapping`."""
    name = mapping_or_name if isinstance(mapping_or_name, str) else _mapping_converter_name(mapping_or_name)
    unregister_converter(name)
