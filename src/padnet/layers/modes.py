"""Mode masks and scale factors shared by every PAD layer.

A PAD layer owns one or more *mode groups*. A mode group is a triple

    dynamic  [K, *shape]   K dynamic factors (kernels or experts)
    static   [*shape]      one static copy
    mask     [*shape]      float buffer, 1 = dynamic entry, 0 = static entry

combined (docs/design.md section 1) as

    W_hat = lambda_d * M * sum_k pi_k W_k + lambda_s * (1 - M) * W_s

with lambda_d = 2 * sigmoid(phi), lambda_s = 2 - lambda_d and one scalar phi per
layer. Partitioning, counting, compaction and saving reach layers only through
this module: ``mode_groups()``, ``scales()`` and ``set_mode_mask()``.

Pruned entries (third mode, dynamic sparse training): a group may also hold a
*live mask* L (float buffer, 1 = live, 0 = pruned; registered only once a layer
has been pruned, so older files and unpruned layers are unchanged). With D the
mode mask and the invariant D <= L (a pruned entry is never dynamic), the
static mask is S = L * (1 - D) = L - D and

    W_hat = lambda_d * D * sum_k pi_k W_k + lambda_s * S * W_s.

A pruned entry contributes 0, stores 0 values and gets zero gradient. See
``set_modes()``, ``set_live_mask()`` and ``density()``.

Routing statistics (for function-preserving mode transitions,
:mod:`padnet.transforms.transitions`): every PAD layer keeps ``routing_mean``
``[K]``, a running mean of its routing weights over training forwards (dynamic
conv: ``pi_k(x)`` averaged over the batch; MoE: the gate weight of expert ``k``
averaged over tokens, zero where the expert was not chosen), and
``routing_updates`` (how many batches it has seen). The first ``1 / momentum``
batches are averaged exactly, later ones with an exponential moving average of
momentum :data:`ROUTING_STATS_MOMENTUM`. ``mode_transition_weights()`` turns it
into the mixing weights a dynamic -> static transition folds the K factors with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

SCALE_MODES = ("learned", "none")
ROUTING_STATS_MOMENTUM = 0.01  # EMA weight of one batch once 1 / momentum batches were seen


@dataclass(frozen=True)
class ModeGroup:
    """One maskable tensor family of a PAD layer.

    Attributes:
        name: group name, e.g. ``"weight"``, ``"bias"``, ``"in"``, ``"out"``.
        dynamic: ``[K, *shape]`` dynamic factors.
        static: ``[*shape]`` static copy.
        mask: ``[*shape]`` float buffer, 1 = dynamic, 0 = static.
        channel_dim: axis of ``shape`` that indexes output channels (structured
            granularity groups entries along it), or ``None`` for vectors.
        kernel_dims: number of leading axes of ``shape`` that identify one
            "kernel" (output x input pair); trailing axes are its spatial taps.
        live: ``[*shape]`` float buffer, 1 = live (dynamic or static), 0 =
            pruned; ``None`` when the layer has never been pruned (all live).
    """

    name: str
    dynamic: Tensor
    static: Tensor
    mask: Tensor
    channel_dim: int | None = 0
    kernel_dims: int = 2
    live: Tensor | None = None

    def live_or_ones(self) -> Tensor:
        """The live mask, or ones of the mask's shape/dtype when never pruned."""
        return self.live if self.live is not None else torch.ones_like(self.mask)

    def num_live(self) -> int:
        """Entries that are not pruned (dynamic + static)."""
        return self.mask.numel() if self.live is None else int(self.live.detach().sum())

    @property
    def num_factors(self) -> int:
        return self.dynamic.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.static.shape


class ScaleFactors(nn.Module):
    """Scale factors (lambda_s, lambda_d) with lambda_d = 2 sigmoid(phi).

    ``mode="learned"`` learns one scalar phi initialised to 0 (both scales 1);
    ``mode="none"`` fixes both at 1 and holds no parameter.
    """

    def __init__(self, mode: str = "learned", device=None, dtype=None) -> None:
        super().__init__()
        if mode not in SCALE_MODES:
            raise ValueError(f"unknown scale mode {mode!r}; expected one of {SCALE_MODES}")
        self.mode = mode
        if mode == "learned":
            self.phi = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        else:
            self.register_parameter("phi", None)
            self.register_buffer("_one", torch.ones((), device=device, dtype=dtype), persistent=False)

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return ``(lambda_s, lambda_d)`` as 0-d tensors."""
        if self.phi is None:
            return self._one, self._one
        lambda_d = 2.0 * torch.sigmoid(self.phi)
        return 2.0 - lambda_d, lambda_d

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def validate_mask(mask: Tensor, shape: torch.Size, what: str) -> Tensor:
    """Check a user-supplied mask: right shape, values in {0, 1}."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{what}: mask must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    m = mask.detach()
    if m.dtype == torch.bool:
        return m
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError(f"{what}: mask values must be 0 or 1")
    return m


def combine_factors(
    dynamic: Tensor, static: Tensor, mask: Tensor, lambda_s: Tensor, lambda_d: Tensor, live: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fold mask and scales into the factors.

    Returns ``(dyn, sta)`` with ``dyn = lambda_d * M * W_k`` (``[K, *shape]``)
    and ``sta = lambda_s * (1 - M) * W_s`` (``[*shape]``), so that
    ``W_hat = sum_k pi_k dyn_k + sta``. With a live mask ``L`` (pruned entries
    0, ``M <= L``) the static part is ``lambda_s * (L - M) * W_s``: pruned
    entries contribute nothing. Dead entries get exactly zero gradient.
    """
    dyn = dynamic * (lambda_d * mask)
    sta = static * (lambda_s * ((1.0 if live is None else live) - mask))
    return dyn, sta


class PerProcessCaches:
    """Base of the PAD and compact layer mixins: attributes named in ``_per_process_attrs`` are per-process
    caches, rebuilt on demand (the :func:`cached_derived` entries hold raw storages, which ``torch.load``
    cannot restore): pickling and ``copy.deepcopy`` leave them out of the state."""

    _per_process_attrs: tuple[str, ...] = ("_inference_cache",)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # type: ignore[misc]  # (nn.Module's drops its compiled call)
        for name in self._per_process_attrs:
            state.pop(name, None)
        return state


class PadLayerMixin(PerProcessCaches):
    """Mode-group protocol shared by DynamicConv2d and MoEFeedForward.

    Subclasses define ``_mode_group_specs``: a tuple of
    ``(group, dynamic_attr, static_attr, mask_attr, channel_dim, kernel_dims)``
    and own a ``scale`` (:class:`ScaleFactors`) submodule.
    """

    _mode_group_specs: tuple[tuple[str, str, str, str, int | None, int], ...] = ()
    scale: ScaleFactors

    def mode_groups(self) -> list[ModeGroup]:
        groups = []
        for name, dyn, sta, mask, channel_dim, kernel_dims in self._mode_group_specs:
            d = getattr(self, dyn)
            if d is None:
                continue
            groups.append(ModeGroup(name, d, getattr(self, sta), getattr(self, mask), channel_dim, kernel_dims,
                                    getattr(self, live_mask_attr(mask), None)))
        return groups

    def scales(self) -> tuple[Tensor, Tensor]:
        """``(lambda_s, lambda_d)`` as 0-d tensors."""
        return self.scale()

    @property
    def num_factors(self) -> int:
        return self.mode_groups()[0].num_factors

    def set_mode_mask(self, group: str, mask: Tensor) -> None:
        """Replace one group's mask in place (values 0/1, the group's shape).

        On a pruned layer the mask may not mark a pruned entry dynamic
        (``ValueError``; use :meth:`set_modes` to change both masks).
        """
        for g in self.mode_groups():
            if g.name == group:
                m = validate_mask(mask, g.shape, f"{type(self).__name__}.{group}")
                if g.live is not None:
                    _check_dynamic_within_live(m, g.live, f"{type(self).__name__}.{group}")
                with torch.no_grad():
                    g.mask.copy_(m.to(g.mask.dtype))
                return
        names = [g.name for g in self.mode_groups()]
        raise KeyError(f"{type(self).__name__} has no mode group {group!r}; groups: {names}")

    def set_all_modes(self, dynamic: bool) -> None:
        """Make every live entry dynamic (``True``) or static (``False``); pruned entries stay pruned."""
        with torch.no_grad():
            for g in self.mode_groups():
                if dynamic and g.live is not None:
                    g.mask.copy_(g.live)
                else:
                    g.mask.fill_(1.0 if dynamic else 0.0)

    def dynamic_ratio(self) -> float:
        """Fraction of maskable entries that are dynamic (kappa)."""
        total = sum(g.mask.numel() for g in self.mode_groups())
        live = sum(float(g.mask.sum()) for g in self.mode_groups())
        return live / max(total, 1)

    # ---- pruned mode (live masks) -----------------------------------------------------------
    def density(self) -> float:
        """Fraction of maskable entries that are not pruned (1.0 for a never-pruned layer)."""
        groups = self.mode_groups()
        total = sum(g.mask.numel() for g in groups)
        return sum(g.num_live() for g in groups) / max(total, 1)

    def live_masks(self) -> list[Tensor]:
        """The registered live-mask buffers (empty for a never-pruned layer)."""
        buffers, params = self._buffers, self._parameters  # read directly: this runs on every forward (cache keys)
        lives = []
        for _, dyn, _, mask, _, _ in self._mode_group_specs:
            live = buffers.get(live_mask_attr(mask))
            if live is not None and (params[dyn] if dyn in params else getattr(self, dyn)) is not None:
                lives.append(live)
        return lives

    def has_pruned(self) -> bool:
        """Whether any entry is pruned (cached until a live mask changes)."""
        lives = self.live_masks()
        if not lives:
            return False
        key = tuple((t._version, t.data_ptr()) for t in lives)
        cached = self.__dict__.get("_has_pruned_cache")
        if cached is None or cached[0] != key:
            cached = (key, any(bool((t.detach() == 0).any()) for t in lives))
            self.__dict__["_has_pruned_cache"] = cached
        return cached[1]

    def set_modes(self, group: str, dynamic: Tensor, live: Tensor) -> None:
        """Set one group's mode mask D and live mask L together (0/1, D <= L).

        Registers the live mask the first time. Validates everything before
        writing anything. Weights are not touched (see
        :class:`padnet.transforms.scheduler.ModeScheduler` for transitions).
        """
        spec = self._group_spec(group)
        what = f"{type(self).__name__}.{group}"
        mask = getattr(self, spec[3])
        d = validate_mask(dynamic, mask.shape, what + " (dynamic mask)")
        l_ = validate_mask(live, mask.shape, what + " (live mask)")
        _check_dynamic_within_live(d, l_, what)
        with torch.no_grad():
            live_buf = self._ensure_live_mask(spec[3])
            live_buf.copy_(l_.to(live_buf.dtype))
            mask.copy_(d.to(mask.dtype))

    def set_live_mask(self, group: str, live: Tensor) -> None:
        """Set one group's live mask (1 = live, 0 = pruned); pruned entries must not be dynamic."""
        spec = self._group_spec(group)
        self.set_modes(group, getattr(self, spec[3]).detach(), live)

    def _group_spec(self, group: str):
        for spec in self._mode_group_specs:
            if spec[0] == group and getattr(self, spec[1]) is not None:
                return spec
        names = [g.name for g in self.mode_groups()]
        raise KeyError(f"{type(self).__name__} has no mode group {group!r}; groups: {names}")

    def _ensure_live_mask(self, mask_attr: str) -> Tensor:
        name = live_mask_attr(mask_attr)
        buf = getattr(self, name, None)
        if buf is None:
            mask = getattr(self, mask_attr)
            self.register_buffer(name, torch.ones_like(mask))  # type: ignore[attr-defined]
            buf = getattr(self, name)
        return buf

    def _register_saved_live_masks(self, state_dict, prefix: str) -> None:
        """A file written after pruning holds live masks: register them before loading (older files have none)."""
        for _, dyn, _, mask_attr, _, _ in self._mode_group_specs:
            if getattr(self, dyn, None) is not None and prefix + live_mask_attr(mask_attr) in state_dict:
                self._ensure_live_mask(mask_attr)


    # ---- routing statistics (function-preserving transitions) -----------------------------
    # Subclasses call ``register_routing_stats(self, K)`` in ``__init__`` and
    # ``self.update_routing_stats_(weights)`` in training forwards.
    routing_mean: Tensor
    routing_updates: Tensor
    #: the K routing weights of one input sum to one (softmax conv; MoE gates act per expert,
    #: so a shared entry is exact there too): static -> dynamic is then exact
    routing_sums_to_one: bool = True
    #: dynamic -> static folds with normalised mixing weights (MoE: every expert shares the static
    #: value, so the fold is a gate-weighted average of the experts)
    routing_normalize_mix: bool = False

    @torch.no_grad()
    def update_routing_stats_(self, weights: Tensor) -> None:
        """Fold one batch's mean routing weights ``weights [K]`` into ``routing_mean``."""
        # on the device, no host sync: momentum = max(1 / (n + 1), ROUTING_STATS_MOMENTUM)
        momentum = (1.0 / (self.routing_updates + 1).to(self.routing_mean.dtype)).clamp_min(ROUTING_STATS_MOMENTUM)
        self.routing_mean.lerp_(weights.detach().to(self.routing_mean.dtype), momentum)
        self.routing_updates.add_(1)

    def mode_transition_weights(self) -> tuple[Tensor, Tensor]:
        """``(mix [K], total)`` (float64) for mode transitions.

        dynamic -> static: ``W_s := (lambda_d / lambda_s) * sum_k mix_k W_k``;
        static -> dynamic: ``W_k := (lambda_s / lambda_d) * W_s / total``.
        Softmax routing: ``mix = routing_mean`` normalised, ``total = 1`` (static -> dynamic
        exact). Sigmoid routing: ``mix = routing_mean``, ``total = sum(routing_mean)``
        (approximate: exact only for inputs whose weights equal the mean). MoE: ``mix`` the
        normalised mean gate per expert, ``total = 1`` (static -> dynamic exact).
        Raises ``ValueError`` naming the layer for NaN/inf/negative or all-zero statistics.
        """
        return transition_weights(self.routing_mean, self.routing_sums_to_one or self.routing_normalize_mix,
                                  type(self).__name__)

    def _fill_missing_routing_stats(self, state_dict, prefix: str) -> None:
        """Files written before routing statistics existed load with the initial (uniform) values."""
        for key in ("routing_mean", "routing_updates"):
            if prefix + key not in state_dict and getattr(self, key, None) is not None:
                state_dict[prefix + key] = getattr(self, key).detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._fill_missing_routing_stats(state_dict, prefix)
        self._register_saved_live_masks(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def transition_weights(mean: Tensor, normalize: bool, what: str = "layer") -> tuple[Tensor, Tensor]:
    """``(mix [K], total)`` in float64 from mean routing weights ``mean [K]`` (see ``mode_transition_weights``).

    ``normalize``: ``mix = mean / sum(mean)`` and ``total = 1``; else ``mix = mean`` and
    ``total = sum(mean)``. Raises ``ValueError`` (naming ``what``) for NaN/inf/negative or all-zero means.
    """
    mean = mean.detach().double()
    if not bool(torch.isfinite(mean).all()) or bool((mean < 0).any()):
        raise ValueError(f"{what}: routing statistics (routing_mean) hold NaN, inf or negative values: "
                         f"{mean.tolist()}")
    total = mean.sum()
    if not float(total) > 0:
        raise ValueError(f"{what}: routing statistics (routing_mean) are all zero")
    if normalize:
        return mean / total, torch.ones((), dtype=torch.float64, device=mean.device)
    return mean, total


def register_routing_stats(module: nn.Module, num_factors: int, initial: float, device=None) -> None:
    """Register ``routing_mean`` ``[K]`` (float32, filled with ``initial``) and ``routing_updates`` (long)."""
    module.register_buffer("routing_mean", torch.full((num_factors,), float(initial), device=device))
    module.register_buffer("routing_updates", torch.zeros((), dtype=torch.long, device=device))


def is_pad_layer(module: nn.Module) -> bool:
    return isinstance(module, PadLayerMixin)


def temperature_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified_name, layer)`` of every PAD or deploy-form layer with a router temperature.

    Structural: the layer is a PAD / compact layer and its type defines a
    ``temperature`` property (the dynamic conv does; MoE routing has none).
    """
    for name, module in model.named_modules():
        if (is_pad_layer(module) or is_compact_layer(module)) and isinstance(
                getattr(type(module), "temperature", None), property):
            yield name, module


def pad_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, layer)`` for every PAD layer in ``model``."""
    for name, module in model.named_modules():
        if is_pad_layer(module):
            yield name, module


def tensor_key(tensors: tuple[Tensor, ...]) -> tuple:
    """Changes whenever any tensor is updated in place (version counter) or replaced (storage, dtype, device)."""
    return tuple([(t._version, t.data_ptr(), t.dtype, t.device) for t in tensors])  # (list: faster than a generator)


def cached_derived(module: nn.Module, name: str, tensors: tuple[Tensor, ...], compute):
    """``compute()`` cached on ``module`` under ``name`` until any of ``tensors`` changes (:func:`tensor_key`).

    Optimizer steps, ``load_state_dict`` and ``set_mode_mask`` all update in
    place and so invalidate. A miss also drops every other entry whose tensors
    have changed since (a derived form of an old mask kind is never kept), while
    entries still valid stay: two forms one call needs (a compact layer's padded
    static rows and its dense factors) do not evict each other. The cache is a
    plain attribute: never saved.
    """
    key = tensor_key(tensors)
    store = module.__dict__.get("_inference_cache")
    if store is None:
        store = module.__dict__["_inference_cache"] = {}
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    for other in [n for n, entry in store.items() if n == name or tensor_key(entry[3]) != entry[0]]:
        del store[other]
    value = compute()
    # the entry holds the keyed tensors' storages: while it lives, no new storage can be allocated at
    # their addresses, so a ``param.data = ...`` replacement (which keeps the version counter) always
    # changes the key's data pointer; it holds the tensors themselves to recheck their key
    store[name] = (key, value, tuple(t.untyped_storage() for t in tensors), tensors)
    return value


@functools.lru_cache(maxsize=None)  # a handful of attribute names; looked up on every forward
def live_mask_attr(mask_attr: str) -> str:
    """Buffer name of the live mask paired with a mode-mask buffer (``mode_mask`` -> ``live_mask``)."""
    return mask_attr.replace("mode_mask", "live_mask") if "mode_mask" in mask_attr else mask_attr + "_live"


def _check_dynamic_within_live(dynamic: Tensor, live: Tensor, what: str) -> None:
    bad = (dynamic.to(torch.bool) & ~live.to(device=dynamic.device).to(torch.bool))
    if bool(bad.any()):
        raise ValueError(f"{what}: {int(bad.sum())} entries are marked dynamic but pruned "
                         f"(a pruned entry cannot be dynamic: the mode mask must be <= the live mask)")


def register_mask(module: nn.Module, name: str, shape, device=None, dtype=None) -> None:
    """Register an all-dynamic (ones) float mask buffer."""
    module.register_buffer(name, torch.ones(shape, device=device, dtype=dtype or torch.float32))


class PackedModeGroup(nn.Module):
    """Deploy form of a mode group: only live entries, scales folded in.

    Stores ``static_values`` ``[n_static]`` (= lambda_s * W_s where M = 0) and
    ``dynamic_values`` ``[K, n_dynamic]`` (= lambda_d * W_k where M = 1) plus a
    bool ``mask`` buffer of the group's shape. Dead entries are not stored.
    A group with pruned entries also holds a bool ``live`` buffer (registered
    only then); static values are then stored for ``live & ~mask`` only and
    pruned entries store nothing.
    """

    def __init__(self, mask: Tensor, num_factors: int, device=None, dtype=None, live: Tensor | None = None) -> None:
        super().__init__()
        mask = mask.detach().to(device=device).bool()
        self.register_buffer("mask", mask)
        if live is not None:
            live = live.detach().to(device=mask.device).bool()
            if tuple(live.shape) != tuple(mask.shape):
                raise ValueError(f"live mask has shape {tuple(live.shape)}, expected {tuple(mask.shape)}")
            _check_dynamic_within_live(mask, live, "PackedModeGroup")
            self.register_buffer("live", live)
        else:
            self.register_buffer("live", None)
        self.group_name: str | None = None  # the PAD layer's mode group this packs
        n_dyn = int(mask.sum())
        n_live = mask.numel() if live is None else int(live.sum())
        self.static_values = nn.Parameter(torch.zeros(n_live - n_dyn, device=mask.device, dtype=dtype))
        self.dynamic_values = nn.Parameter(torch.zeros(num_factors, n_dyn, device=mask.device, dtype=dtype))

    @classmethod
    def from_group(cls, group: ModeGroup, lambda_s: Tensor, lambda_d: Tensor) -> "PackedModeGroup":
        mask = group.mask.detach() > 0.5
        live = None
        if group.live is not None and not bool((group.live.detach() > 0.5).all()):
            live = group.live.detach() > 0.5
        packed = cls(mask, group.num_factors, device=group.static.device, dtype=group.static.dtype, live=live)
        packed.group_name = group.name
        with torch.no_grad():
            packed.static_values.copy_((lambda_s * group.static)[packed.static_mask])
            packed.dynamic_values.copy_((lambda_d * group.dynamic)[:, mask])
        return packed

    @property
    def static_mask(self) -> Tensor:
        """Bool ``[*shape]``: entries whose value is in ``static_values`` (live and not dynamic)."""
        return ~self.mask if self.live is None else self.live & ~self.mask

    @property
    def has_pruned(self) -> bool:
        return self.live is not None

    @property
    def num_factors(self) -> int:
        return self.dynamic_values.shape[0]

    @property
    def all_static(self) -> bool:
        """No dynamic and no pruned entry: ``static_values`` is the whole dense tensor."""
        return self.dynamic_values.shape[1] == 0 and self.live is None

    @property
    def all_dynamic(self) -> bool:
        """No static and no pruned entry: ``dynamic_values`` is the whole dense ``[K, *shape]`` tensor."""
        return self.static_values.numel() == 0 and self.live is None

    def storage_bits(self) -> int:
        """Honest storage of this group: value bits plus one bit per mask entry (two with a live mask)."""
        value_bits = (self.static_values.numel() + self.dynamic_values.numel()) * self.static_values.element_size() * 8
        mask_bits = self.mask.numel() * (1 if self.live is None else 2)
        return value_bits + mask_bits

    def materialize(self) -> tuple[Tensor, Tensor]:
        """Return ``(dyn [K, *shape], sta [*shape])`` with zeros at dead entries."""
        shape = self.mask.shape
        k = self.num_factors
        if self.all_dynamic:
            return self.dynamic_values.reshape(k, *shape), self.dynamic_values.new_zeros(shape)
        if self.all_static:
            return self.static_values.new_zeros(k, *shape), self.static_values.reshape(shape)
        sta = self.static_values.new_zeros(shape).masked_scatter(self.static_mask, self.static_values)
        flat_mask = self.mask.reshape(-1)
        dyn = self.dynamic_values.new_zeros(k, flat_mask.numel())
        dyn = _scatter_columns(dyn, flat_mask, self.dynamic_values)
        return dyn.reshape(k, *shape), sta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "live" in state_dict and self.live is None:
            raise ValueError(f"{prefix}live: the file has pruned entries but this deploy form was built without "
                             f"them (set the live masks before compact_)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = "" if self.live is None else f", pruned={int((~self.live).sum())}"
        return f"shape={tuple(self.mask.shape)}, K={self.num_factors}, dynamic={self.dynamic_values.shape[1]}{extra}"


def _scatter_columns(dst: Tensor, column_mask: Tensor, values: Tensor) -> Tensor:
    """Out-of-place ``dst[:, column_mask] = values`` that keeps autograd to ``values``."""
    index = column_mask.nonzero().squeeze(1).expand(dst.shape[0], -1)
    return dst.scatter(1, index, values)


class CompactLayerMixin(PerProcessCaches):
    """Marker + protocol for deploy forms: ``packed_groups()`` lists PackedModeGroups."""

    def packed_groups(self) -> list[PackedModeGroup]:
        return [m for m in self.children() if isinstance(m, PackedModeGroup)]  # type: ignore[attr-defined]


def is_compact_layer(module: nn.Module) -> bool:
    return isinstance(module, CompactLayerMixin)
