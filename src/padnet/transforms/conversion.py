"""Conversion registry: which modules become PAD layers, how, and what their deploy form is.

API (other modules register against this; keep it stable)::

    Site(name, target_type, converter)          # a convertible place in a model (frozen)
    Converter(name, target_type, match, convert)
        match(qualified_name, module) -> Site | None     structural: by type and shape, never by name
        convert(model, site, cfg: PadConfig) -> None      builds the PAD layer, swaps it in
    register_converter(converter, *, priority=0, overwrite=False) -> Converter
    unregister_converter(name)                   # KeyError naming the known converters
    get_converter(name) / converter_names()      # names in match order
    CONVERTERS                                   # the padnet.registry.Registry behind them (read it, do
                                                 # not register on it directly: priorities live beside it)
    find_sites(model) -> list[Site]              # every convertible site, in module order
    swap_module(model, qualified_name, new) -> old_module
    register_deploy_form(pad_layer_type, builder, *, overwrite=False)   # builder(layer) -> deploy module
    deploy_form(layer) -> nn.Module              # compact_ uses this

Matching: for each module of ``model.named_modules()`` (PAD layers, deploy
forms and everything inside them skipped) the converters are tried in order of
decreasing ``priority`` (ties: registration order) and the first ``Site``
returned wins. ``Site.name`` is the name target patterns are matched against
(for HF BERT blocks: ``"<layer>.intermediate"``). Adding a layer family means
registering one :class:`Converter` (and, for a new PAD layer type, one deploy
form) -- nothing else changes. Built-in: ``"conv2d"`` (exact ``nn.Conv2d``) and
``"sequential_ffn"`` (``nn.Sequential(Linear, act, Linear[, Dropout])``);
:mod:`padnet.models.bert` registers ``"bert_ffn"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

from ..layers.dynamic_conv import CompactDynamicConv2d, DynamicConv2d
from ..layers.modes import is_compact_layer, is_pad_layer
from ..layers.moe import CompactMoEFeedForward, MoEFeedForward
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .config import PadConfig

TARGET_TYPES = ("conv2d", "ffn")

__all__ = [
    "Site",
    "Converter",
    "register_converter",
    "unregister_converter",
    "get_converter",
    "converter_names",
    "CONVERTERS",
    "find_sites",
    "swap_module",
    "register_deploy_form",
    "deploy_form",
    "moe_from_linears",
    "moe_options",
]


@dataclass(frozen=True)
class Site:
    """A convertible place: ``name`` (qualified, matched by target patterns), its
    ``target_type`` (``"conv2d"`` or ``"ffn"``) and the ``converter`` (name) that found it."""

    name: str
    target_type: str
    converter: str


@dataclass(frozen=True)
class Converter:
    """How one module family becomes a PAD layer (see the module docstring)."""

    name: str
    target_type: str
    match: Callable[[str, nn.Module], Site | None]
    convert: Callable[[nn.Module, Site, "PadConfig"], None]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a converter needs a non-empty name, got {self.name!r}")
        if self.target_type not in TARGET_TYPES:
            raise ValueError(f"converter {self.name!r}: target_type must be one of {TARGET_TYPES}, "
                             f"got {self.target_type!r}")
        if not callable(self.match) or not callable(self.convert):
            raise TypeError(f"converter {self.name!r}: match and convert must be callables")

    def site(self, name: str) -> Site:
        return Site(name, self.target_type, self.name)


def _check_converter(name: str, converter: object) -> None:
    if not isinstance(converter, Converter):
        raise TypeError(f"register_converter expects a Converter, got {type(converter).__name__}")
    if converter.name != name:
        raise ValueError(f"converter {converter.name!r} registered under another name {name!r}")


CONVERTERS: Registry[Converter] = Registry("converter", check=_check_converter)
_ORDER: dict[str, tuple[int, int]] = {}  # name -> (priority, registration index): the match order
_COUNTER = [0]


def register_converter(converter: Converter, *, priority: int = 0, overwrite: bool = False) -> Converter:
    """Add ``converter`` to :data:`CONVERTERS`; higher ``priority`` is tried first (ties: registration
    order). Returns it. Registering the same converter again with the same priority changes nothing; a
    different converter (or priority) under a taken name needs ``overwrite=True``."""
    if not isinstance(converter, Converter):
        raise TypeError(f"register_converter expects a Converter, got {type(converter).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {priority!r}")
    name = converter.name
    if not overwrite and CONVERTERS.get(name, None) is converter and name in _ORDER \
            and _ORDER[name][0] == priority:
        return converter  # the same registration again
    if name in CONVERTERS and not overwrite:
        raise ValueError(f"converter {name!r} is already registered (pass overwrite=True to replace it)")
    CONVERTERS.register(name, converter, overwrite=True)
    _COUNTER[0] += 1
    _ORDER[name] = (priority, _COUNTER[0])
    return converter


def unregister_converter(name: str) -> None:
    """Remove a converter; an unknown name raises ``KeyError`` listing the registered ones."""
    CONVERTERS.unregister(name)
    _ORDER.pop(name, None)


def get_converter(name: str) -> Converter:
    """The converter registered as ``name`` (``KeyError`` / ``ValueError`` listing the names if unknown)."""
    return CONVERTERS.get(name)


def converter_names() -> list[str]:
    """Registered converter names in match order (priority, then registration)."""
    # a name registered on CONVERTERS directly has no priority: 0, after the others of priority 0
    order = {n: _ORDER.get(n, (0, float("inf"))) for n in CONVERTERS}
    return sorted(order, key=lambda n: (-order[n][0], order[n][1]))


def find_sites(model: nn.Module) -> list[Site]:
    """Every site some converter matches, in module order (inside PAD layers / deploy forms: none)."""
    ordered = [get_converter(n) for n in converter_names()]
    found: list[Site] = []
    skip: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in skip:
            continue
        if is_pad_layer(module) or is_compact_layer(module):
            skip.update(id(m) for m in module.modules())
            continue
        for conv in ordered:
            site = conv.match(name, module)
            if site is not None:
                found.append(site)
                break
    return found


def swap_module(model: nn.Module, qualified_name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``qualified_name`` of ``model`` by ``new``; returns the old module.

    Works for attributes and ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``
    children alike (all are registered by name). ``new`` takes the old
    module's train/eval mode. The root itself cannot be swapped.
    """
    if not isinstance(new, nn.Module):
        raise TypeError(f"swap_module: the replacement for {qualified_name!r} must be an nn.Module, "
                        f"got {type(new).__name__}")
    if not qualified_name:
        raise ValueError("swap_module: cannot swap the root module (qualified_name is empty)")
    parent_name, _, child = qualified_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError as exc:
        raise KeyError(f"swap_module: {qualified_name!r} is not a submodule of the model ({exc})") from None
    old = parent._modules.get(child)
    if old is None:
        raise KeyError(f"swap_module: {qualified_name!r} is not a submodule of the model")
    new.train(old.training)
    setattr(parent, child, new)
    return old


# ---------------------------------------------------------------------------- deploy forms

_DEPLOY_FORMS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_deploy_form(pad_layer_type: type, builder: Callable[[nn.Module], nn.Module], *,
                         overwrite: bool = False) -> None:
    """``builder(layer)`` returns the deploy form of a ``pad_layer_type`` layer (same outputs)."""
    if not (isinstance(pad_layer_type, type) and issubclass(pad_layer_type, nn.Module)):
        raise TypeError(f"register_deploy_form expects an nn.Module subclass, got {pad_layer_type!r}")
    if pad_layer_type in _DEPLOY_FORMS and not overwrite:
        raise ValueError(f"a deploy form for {pad_layer_type.__name__} is already registered (pass overwrite=True)")
    _DEPLOY_FORMS[pad_layer_type] = builder


def deploy_form(layer: nn.Module) -> nn.Module:
    """Deploy form of one PAD layer, via the builder registered for its type (or nearest base)."""
    for cls in type(layer).__mro__:
        builder = _DEPLOY_FORMS.get(cls)
        if builder is not None:
            return builder(layer).train(layer.training)
    known = sorted(c.__name__ for c in _DEPLOY_FORMS)
    raise TypeError(f"no deploy form registered for {type(layer).__name__}; registered: {known}")


# ---------------------------------------------------------------------------- built-in converters


def moe_from_linears(fc_in: nn.Linear, fc_out: nn.Linear, activation: nn.Module, cfg: "PadConfig") -> MoEFeedForward:
    """``MoEFeedForward`` upcycled / split from ``fc_out(act(fc_in(x)))`` with ``cfg.moe`` options."""
    return MoEFeedForward.from_dense(fc_in, fc_out, activation=activation, **moe_options(cfg.moe))


def moe_options(m) -> dict:
    """``MoEFeedForward.from_dense`` keyword arguments of a :class:`MoEConfig`."""
    return {
        "num_experts": m.num_experts, "top_k": m.top_k, "init": m.init, "noise_std": m.noise_std,
        "scale": m.scale, "aux_loss_coef": m.aux_loss_coef, "routing": m.routing,
        "balance_loss": m.balance_loss, "z_loss_coef": m.z_loss_coef, "bias_balancing": m.bias_balancing,
        "bias_update_rate": m.bias_update_rate, "normalize_gates": m.normalize_gates,
    }


def _match_conv2d(name: str, module: nn.Module) -> Site | None:
    return CONV2D.site(name) if type(module) is nn.Conv2d else None


def _convert_conv2d(model: nn.Module, site: Site, cfg: "PadConfig") -> None:
    c = cfg.conv
    module = model.get_submodule(site.name)
    new = DynamicConv2d.from_conv(
        module, num_kernels=c.num_kernels, init=c.init, noise_std=c.noise_std, reduction=c.reduction,
        temperature=c.temperature, routing=c.routing, scale=c.scale, backend=c.backend,
        router_init=c.router_init, router_norm=c.router_norm,
    )
    swap_module(model, site.name, new)


def sequential_ffn_parts(module: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear, nn.Module | None] | None:
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


def _match_sequential_ffn(name: str, module: nn.Module) -> Site | None:
    return SEQUENTIAL_FFN.site(name) if sequential_ffn_parts(module) is not None else None


def _convert_sequential_ffn(model: nn.Module, site: Site, cfg: "PadConfig") -> None:
    module = model.get_submodule(site.name)
    fc_in, act, fc_out, dropout = sequential_ffn_parts(module)
    moe = moe_from_linears(fc_in, fc_out, act, cfg)
    swap_module(model, site.name, moe if dropout is None else nn.Sequential(moe, dropout))


CONV2D = register_converter(Converter("conv2d", "conv2d", _match_conv2d, _convert_conv2d))
SEQUENTIAL_FFN = register_converter(
    Converter("sequential_ffn", "ffn", _match_sequential_ffn, _convert_sequential_ffn)
)
register_deploy_form(DynamicConv2d, CompactDynamicConv2d)
register_deploy_form(MoEFeedForward, CompactMoEFeedForward.from_layer)
