"""Mode partition: decide which entries of each PAD layer stay dynamic.

``partition_(model, batches, loss_fn, ratio)`` (or ``partition_(model, batches,
loss_fn, PartitionConfig(...))``) runs Iterative Mode Partition (PAD-Net, He et
al. 2023) or any registered criterion; see ``docs/partition.md``.
"""

from .config import DEFAULT_RATIO, SCOPES, PartitionConfig, check_ratio
from .criteria import (
    CRITERIA,
    STATS,
    Criterion,
    GroupStats,
    get_criterion,
    list_criteria,
    register_criterion,
    unregister_criterion,
)
from .partitioner import SymmetricModesWarning, partition_
from .report import IterationRecord, LayerPartition, PartitionReport
from .schedules import SCHEDULES, get_schedule, list_schedules, register_schedule, unregister_schedule
from .units import GRANULARITIES, LayerPlan, select_top

__all__ = [
    "partition_",
    "PartitionConfig",
    "DEFAULT_RATIO",
    "check_ratio",
    "CRITERIA",
    "SCHEDULES",
    "PartitionReport",
    "LayerPartition",
    "IterationRecord",
    "SymmetricModesWarning",
    "Criterion",
    "GroupStats",
    "STATS",
    "register_criterion",
    "unregister_criterion",
    "get_criterion",
    "list_criteria",
    "register_schedule",
    "unregister_schedule",
    "get_schedule",
    "list_schedules",
    "SCOPES",
    "GRANULARITIES",
    "LayerPlan",
    "select_top",
]
