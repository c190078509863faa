"""The transform record: one owner for everything padnet did to a model.

``model.padnet_state`` (a :class:`PadState`, the *only* padnet attribute on a
model) holds the zoo spec the model was built from and every transform applied
to it, in order::

    {"version": 1,
     "model_spec": {"name": "resnet18", "kwargs": {...}} | None,
     "steps": [{"op": "dynamize", "params": {"config": {...PadConfig v2...}, "sites": [...]}},
               {"op": "partition", "params": {...}},
               {"op": "compact",   "params": {"layers": [...]}},
               {"op": "fold_bn",   "params": {"pairs": [[conv, bn], ...]}}]}

It is plain JSON (``to_dict`` / ``from_dict``), written by :func:`padnet.save`
into the file header and replayed by :func:`padnet.load`: ops registered with a
replay function (:func:`register_op`; built in: :data:`ARCHITECTURE_OPS`,
whose replays :mod:`padnet.io.serialization` registers) are re-applied in order
to the rebuilt model before the weights are loaded; the others (``partition``:
the masks themselves live in the state dict) are provenance. Later transforms
(mode transitions, gates, ...) register their ops; an op this version does not
know is refused on load rather than ignored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

STATE_VERSION = 1
STATE_ATTRIBUTE = "padnet_state"
ARCHITECTURE_OPS = ("dynamize", "compact", "fold_bn")
"""Built-in ops that change the module tree; :func:`padnet.load` replays them in order."""
PROVENANCE_OPS = ("partition",)
"""Built-in ops whose effect is fully in the state dict (recorded for provenance)."""
# Registered by their modules (imported by padnet.io.serialization, so a load knows them):
# "gates" / "harden_gates" (transforms/gates.py, replayed), "transition" (transforms/transitions.py)
# and "mode_scheduler" (transforms/scheduler.py), provenance.

__all__ = ["PadState", "Step", "ReplayContext", "get_state", "find_state", "set_model_spec", "register_op",
           "known_ops", "get_replay", "get_check", "STATE_VERSION", "STATE_ATTRIBUTE", "ARCHITECTURE_OPS", "PROVENANCE_OPS"]


@dataclass
class ReplayContext:
    """What a replay function may read: the file's tensors and validated header, and its name for errors.

    ``index``: the position of the step being replayed or checked in
    ``metadata["state"]["steps"]`` (a replay may look at the steps after it).
    """

    tensors: dict[str, Any]
    metadata: dict[str, Any]
    source: str
    index: int = -1


Replay = Callable[[nn.Module, dict, ReplayContext], None]
"""``replay(model, params, context)``: re-apply one recorded architecture change to a rebuilt model."""
Check = Callable[[dict, ReplayContext], None]
"""``check(params, context)``: validate one recorded step against the file before any model is built."""

_KNOWN_OPS: dict[str, Replay | None] = {op: None for op in (*ARCHITECTURE_OPS, *PROVENANCE_OPS)}
_CHECKS: dict[str, Check] = {}


def register_op(op: str, replay: Replay | None = None, *, check: Check | None = None,
                overwrite: bool = False) -> None:
    """Declare an op name (e.g. ``"transition"``) so records holding it load.

    ``replay`` (for ops that change the module tree) is called by :func:`padnet.load`
    in record order, before the weights are loaded; ops without one are provenance.
    ``check`` (optional) is called by :func:`padnet.load` on every step of the op
    before anything is built (raise ``ValueError`` naming the problem).
    Re-registering an op with a different replay needs ``overwrite=True``.
    """
    if not isinstance(op, str) or not op:
        raise ValueError(f"an op name must be a non-empty string, got {op!r}")
    if replay is not None and not callable(replay):
        raise TypeError(f"replay for op {op!r} must be callable, got {type(replay).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"check for op {op!r} must be callable, got {type(check).__name__}")
    current = _KNOWN_OPS.get(op)
    if current is not None and replay is not current and not overwrite:
        raise ValueError(f"op {op!r} already has a replay function (pass overwrite=True)")
    _KNOWN_OPS[op] = replay if replay is not None else current
    if check is not None:
        _CHECKS[op] = check


def get_check(op: str) -> Check | None:
    """The pre-build check of ``op`` (``None`` if it has none)."""
    return _CHECKS.get(op)


def known_ops() -> list[str]:
    return sorted(_KNOWN_OPS)


def get_replay(op: str) -> Replay | None:
    """The replay function of ``op`` (``None`` for provenance ops); ``KeyError`` if unknown."""
    if op not in _KNOWN_OPS:
        raise KeyError(f"unknown transform op {op!r}; known: {known_ops()}")
    return _KNOWN_OPS[op]


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from None


@dataclass
class Step:
    """One applied transform: ``op`` and its JSON ``params``."""

    op: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "params": copy.deepcopy(self.params)}


@dataclass
class PadState:
    """Versioned, JSON-serialisable record of how a model was built and transformed."""

    model_spec: dict[str, Any] | None = None
    steps: list[Step] = field(default_factory=list)
    version: int = STATE_VERSION

    def append(self, op: str, **params: Any) -> Step:
        """Record that ``op`` was applied with ``params`` (JSON values); returns the step."""
        if op not in _KNOWN_OPS:
            raise ValueError(f"unknown transform op {op!r}; known: {known_ops()} (padnet.transforms.record.register_op)")
        _check_json(params, f"params of op {op!r}")
        step = Step(op, copy.deepcopy(params))
        self.steps.append(step)
        return step

    def ops(self) -> list[str]:
        """Op names in the order they were applied."""
        return [s.op for s in self.steps]

    def last(self, op: str) -> Step | None:
        """The most recent step with ``op``, or ``None``."""
        for step in reversed(self.steps):
            if step.op == op:
                return step
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_spec": copy.deepcopy(self.model_spec),
                "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Any) -> "PadState":
        """Validate and build; raises ``ValueError`` naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a PadState must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "model_spec", "steps"})
        if unknown:
            raise ValueError(f"unknown PadState keys {unknown}")
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"PadState version {version!r} is not supported (this padnet reads {STATE_VERSION})")
        spec = data.get("model_spec")
        if spec is not None:
            check_model_spec(spec)
        steps = data.get("steps", [])
        if not isinstance(steps, list):
            raise ValueError(f"PadState steps must be a list, got {type(steps).__name__}")
        state = cls(model_spec=copy.deepcopy(spec))
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or set(step) != {"op", "params"}:
                raise ValueError(f"PadState step {i} must be {{'op': str, 'params': dict}}, got {step!r}")
            if not isinstance(step["op"], str) or step["op"] not in _KNOWN_OPS:
                raise ValueError(f"PadState step {i}: unknown op {step['op']!r}; known: {known_ops()}")
            if not isinstance(step["params"], dict):
                raise ValueError(f"PadState step {i} ({step['op']}): params must be an object")
            state.steps.append(Step(step["op"], copy.deepcopy(step["params"])))
        return state

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PadState":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PadState JSON is malformed: {exc}") from None
        return cls.from_dict(data)

    def copy(self) -> "PadState":
        return PadState.from_dict(self.to_dict())


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A model spec is ``{"name": str, "kwargs": {str: JSON}}``; raises ``ValueError`` otherwise."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"a model spec must be {{'name': str, 'kwargs': dict}}, got {spec!r}")
    unknown = sorted(set(spec) - {"name", "kwargs"})
    if unknown:
        raise ValueError(f"unknown model spec keys {unknown}")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"model spec kwargs must be an object with string keys, got {kwargs!r}")
    return spec


def find_state(model: nn.Module) -> PadState | None:
    """The model's :class:`PadState`, or ``None`` if padnet never touched it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is not None and not isinstance(state, PadState):
        raise TypeError(f"model.{STATE_ATTRIBUTE} is a {type(state).__name__}, not a PadState")
    return state


def get_state(model: nn.Module) -> PadState:
    """The model's :class:`PadState`, created (empty) and attached if missing."""
    state = find_state(model)
    if state is None:
        state = PadState()
        model.__dict__[STATE_ATTRIBUTE] = state
    return state


def set_model_spec(model: nn.Module, name: str, kwargs: dict[str, Any], *, overwrite: bool = True) -> nn.Module:
    """Record how to rebuild ``model`` (a registered zoo name and its kwargs); returns ``model``."""
    state = get_state(model)
    if state.model_spec is not None and not overwrite:
        return model
    spec = check_model_spec({"name": name, "kwargs": dict(kwargs)})
    _check_json(spec, f"model spec of {name!r}")
    state.model_spec = copy.deepcopy(spec)
    return model
