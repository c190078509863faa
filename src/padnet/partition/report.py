"""``PartitionReport``: what one :func:`padnet.partition.partition_` call did."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["IterationRecord", "LayerPartition", "PartitionReport"]


@dataclass
class LayerPartition:
    """One PAD layer: maskable entries and its dynamic ratio before / after."""

    name: str
    type: str
    entries: int
    num_factors: int
    ratio_before: float
    ratio_after: float
    dynamic_entries: int
    symmetric: bool = False


@dataclass
class IterationRecord:
    """One IMP iteration: scheduled kept ratio and what was kept."""

    iteration: int
    target_ratio: float
    kept_entries: int
    ratio: float


@dataclass
class PartitionReport:
    """Result of a partition call.

    ``ratio`` is the achieved global dynamic ratio (dynamic entries / maskable
    entries, all PAD layers); ``size_before`` / ``size_after`` are
    :func:`padnet.count_parameters` dicts (``static dynamic router other total``);
    ``history`` has one :class:`IterationRecord` per iteration;
    ``symmetric_layers`` lists layers whose modes were symmetric or whose scores
    were all zero (see :class:`~padnet.partition.SymmetricModesWarning`).
    """

    criterion: str
    schedule: str
    scope: str
    granularity: str
    iterations: int
    target_ratio: float
    ratio: float
    entries: int
    dynamic_entries: int
    num_batches: int
    world_size: int
    seconds: float
    size_before: dict[str, int]
    size_after: dict[str, int]
    layers: list[LayerPartition] = field(default_factory=list)
    history: list[IterationRecord] = field(default_factory=list)
    symmetric_layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    transition: dict[str, Any] | None = None  # TransitionReport.to_dict() of the mask change (issue 11)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PartitionReport":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PartitionReport keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        data["layers"] = [LayerPartition(**row) for row in data.get("layers", [])]
        data["history"] = [IterationRecord(**row) for row in data.get("history", [])]
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PartitionReport":
        """Parse a JSON string, or read a JSON file."""
        source = str(text_or_path)
        if not source.lstrip().startswith("{"):
            source = Path(source).read_text()
        return cls.from_dict(json.loads(source))

    # ---- display ---------------------------------------------------------------------------
    def __str__(self) -> str:
        rows = [("layer", "type", "K", "entries", "kappa before", "kappa after", "")]
        for r in self.layers:
            rows.append((r.name or "<root>", r.type, str(r.num_factors), f"{r.entries:,}", f"{r.ratio_before:.4f}",
                         f"{r.ratio_after:.4f}", "symmetric!" if r.symmetric else ""))
        before = sum(r.ratio_before * r.entries for r in self.layers) / max(self.entries, 1)
        rows.append(("TOTAL", "", "", f"{self.entries:,}", f"{before:.4f}", f"{self.ratio:.4f}", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            f"mode partition: criterion={self.criterion} schedule={self.schedule} iterations={self.iterations} "
            f"scope={self.scope} granularity={self.granularity} batches={self.num_batches} "
            f"world_size={self.world_size}"
        ]
        table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        table.insert(1, "  ".join("-" * w for w in widths).rstrip())
        lines += table
        if self.history:
            steps = ", ".join(f"{h.iteration}: {h.ratio:.4f}" for h in self.history)
            lines.append(f"kept ratio per iteration: {steps}")
        sb, sa = self.size_before.get("total", 0), self.size_after.get("total", 0)
        lines.append(
            f"target kappa={self.target_ratio:g}  achieved={self.ratio:.6f} "
            f"({self.dynamic_entries:,}/{self.entries:,} entries dynamic)"
        )
        lines.append(f"deployable parameters: {sb:,} -> {sa:,}" + (f" ({sa / sb:.3f}x)" if sb else ""))
        lines.append(f"time: {self.seconds:.2f} s")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)
