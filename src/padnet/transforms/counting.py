"""Deployable parameter counts (docs/design.md, "The math").

A dynamic entry costs K numbers, a static entry 1 and a pruned entry 0; entries the mask hides
(W_s where M = 1, W_k where M = 0) are dead and not counted. Router and scale
parameters of PAD layers count as ``router``; everything else as ``other``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..layers.modes import is_compact_layer, is_pad_layer


@dataclass(frozen=True)
class ParameterCount:
    """Deployable parameter counts of a model or layer."""

    static: int = 0
    dynamic: int = 0
    router: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.static + self.dynamic + self.router + self.other

    @property
    def dynamic_entries_ratio(self) -> float:
        """Not kappa: share of deployable floats that are dynamic factors."""
        return self.dynamic / self.total if self.total else 0.0

    def __add__(self, other: "ParameterCount") -> "ParameterCount":
        return ParameterCount(
            self.static + other.static, self.dynamic + other.dynamic,
            self.router + other.router, self.other + other.other,
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _layer_count(layer: nn.Module) -> ParameterCount:
    """Count one PAD layer or deploy form; its non-mode parameters are router/scale."""
    static = dynamic = 0
    mode_params: set[int] = set()
    if is_pad_layer(layer):
        for g in layer.mode_groups():
            live = int(g.mask.detach().sum())  # dynamic entries; pruned entries (live mask 0) count 0
            static += g.num_live() - live
            dynamic += g.num_factors * live
            mode_params.update({id(g.dynamic), id(g.static)})
    else:
        for packed in layer.packed_groups():
            static += packed.static_values.numel()
            dynamic += packed.dynamic_values.numel()
            mode_params.update({id(packed.static_values), id(packed.dynamic_values)})
    router = sum(p.numel() for p in layer.parameters() if id(p) not in mode_params)
    return ParameterCount(static=static, dynamic=dynamic, router=router)


def layer_counts(model: nn.Module) -> dict[str, ParameterCount]:
    """Per-layer counts: PAD layers and deploy forms by name, the rest pooled under ``"<other>"``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    counts: dict[str, ParameterCount] = {}
    inside: set[int] = set()
    other = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if is_pad_layer(module) or is_compact_layer(module):
            counts[name] = _layer_count(module)
            inside.update(id(m) for m in module.modules())
            seen.update(id(p) for p in module.parameters())
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                other += p.numel()
    counts["<other>"] = ParameterCount(other=other)
    return counts


def count_parameters(model: nn.Module) -> ParameterCount:
    """Deployable counts ``.static .dynamic .router .other .total`` of ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters expects an nn.Module, got {type(model).__name__}")
    total = ParameterCount()
    for c in layer_counts(model).values():
        total = total + c
    return total


def deploy_storage(model: nn.Module) -> dict[str, int]:
    """Honest storage of a deploy-form (compact) model: values plus mask bits.

    ``value_bytes``: every parameter and non-mask buffer (``numel * element_size``);
    ``mask_bits``: one bit per entry of every packed mode mask, two where the
    group also has a live mask (pruned entries); ``bytes`` = value bytes + mask
    bits rounded up to bytes. Raises ``ValueError`` on a model that is not compact.
    """
    from ..layers.modes import PackedModeGroup

    packed = [m for m in model.modules() if isinstance(m, PackedModeGroup)]
    if not packed:
        raise ValueError("deploy_storage: the model has no deploy-form (compact) layers; run padnet.compact_ first")
    mask_ids = {id(t) for m in packed for t in (m.mask, m.live) if t is not None}
    value_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    value_bytes += sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in mask_ids)
    mask_bits = sum(m.mask.numel() * (1 if m.live is None else 2) for m in packed)
    return {"value_bytes": value_bytes, "mask_bits": mask_bits, "bytes": value_bytes + (mask_bits + 7) // 8}
