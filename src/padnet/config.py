"""``PadConfig``: how a model is made (partially) dynamic. Versioned, JSON round trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1
TARGET_TYPES = ("conv2d", "ffn")
INITS = ("inherit", "fresh")
ROUTER_INITS = ("official", "torch")
MOE_INITS = ("upcycle", "split")


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Validate a dynamic ratio kappa in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{what} must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {ratio}")
    return float(ratio)


@dataclass
class PadConfig:
    """Configuration of :func:`padnet.dynamize_`.

    Targets: ``target_modules`` is a list of module names matched exactly or as
    a dotted suffix (``"conv1"`` matches ``"layer1.0.conv1"``), or one string
    used as a full-match regular expression (as in peft). ``target_types``
    selects by kind: ``"conv2d"`` and/or ``"ffn"`` (HF BERT-style FFN blocks and
    ``nn.Sequential(Linear, activation, Linear)``). When both are ``None`` the
    default is every FFN block if the model has any, else every ``nn.Conv2d``
    except the stem (first conv) and a conv classifier head, as in the paper.
    ``exclude_modules`` uses the same matching as ``target_modules``.
    """

    target_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    num_kernels: int = 4
    reduction: int = 4
    temperature: float = 1.0
    routing: str = "softmax"
    scale: str = "learned"
    dynamic_ratio: float = 0.3
    init: str = "inherit"  # "inherit": keep a trained conv's function; "fresh": official He fan-out kernels
    router_init: str = "official"  # dynamic-conv router: "official" (PAD-Net code) or "torch" (nn.Linear default)
    noise_std: float = 0.01
    backend: str = "auto"
    num_experts: int = 4
    top_k: int = 2
    moe_init: str = "upcycle"
    aux_loss_coef: float = 0.01
    seed: int | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        check_ratio(self.dynamic_ratio, "dynamic_ratio")
        if self.num_kernels < 1:
            raise ValueError(f"num_kernels (K) must be >= 1, got {self.num_kernels}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"unknown router_init {self.router_init!r}; expected one of {ROUTER_INITS}")
        if self.moe_init not in MOE_INITS:
            raise ValueError(f"unknown moe_init {self.moe_init!r}; expected one of {MOE_INITS}")
        for t in self.target_types or []:
            if t not in TARGET_TYPES:
                raise ValueError(f"unknown target type {t!r}; expected one of {TARGET_TYPES}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"PadConfig version {self.version} is not supported (this padnet reads {CONFIG_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PadConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PadConfig":
        """Parse a JSON string, or read a JSON file when given an existing path."""
        source = str(text_or_path)
        if not source.lstrip().startswith("{"):
            path = Path(source)
            try:
                source = path.read_text()
            except OSError as exc:
                raise FileNotFoundError(f"cannot read PadConfig file {path}: {exc}") from exc
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PadConfig JSON is malformed: {exc}") from exc
        return cls.from_dict(data)
