"""``padnet train`` with a random partition whose per-layer dynamic counts match another run's.

    python experiments/matched_random.py --match experiments/results/study2/e6-w0.25/fm2-imp-init-s0.json -- \\
        --recipe fashion-mnist --variant pad --criterion matched_random --partition-iterations 1 ... --seed 0

The second study's "random, matched" arm (docs/results.md) asks whether IMP's choice of *which*
entries stay dynamic matters once the per-layer allocation is held fixed. ``padnet train`` takes one
global kappa and has no per-layer targets, so this script runs padnet's own trainer
(:class:`padnet.train.loop.Trainer`) with one change: the partition uses the criterion
``matched_random``, whose scores put exactly ``c_l`` uniformly random entries of layer ``l`` above
every other entry of the model, ``c_l`` being the dynamic count of layer ``l`` in the matched run's
partition report (``summary.partition.layers[*].dynamic_entries``). With one IMP iteration, global
scope and kappa = sum(c_l) / N the global top-k selects exactly those entries; the partition is
otherwise identical to the matched run's (same step, same function-preserving transitions, same
optimizer-state reset). The achieved per-layer counts are checked against the targets and a
mismatch stops the run before any training step.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from padnet.layers.modes import ModeGroup, pad_layers
from padnet.train import distributed as D
from padnet.train.config import TrainConfig
from padnet.train.loop import Trainer, resolve_paths
from padnet.transforms.partition import register_criterion

CRITERION = "matched_random"
_ACTIVE: dict[tuple[int, str], Tensor] = {}  # (id(layer), group name) -> scores, set only during a partition


def matched_targets(record: dict[str, Any]) -> dict[str, int]:
    """Per-layer dynamic entry counts ``{layer name: c_l}`` from a study result record (or a summary)."""
    summary = record.get("summary", record)
    partition = summary.get("partition")
    if not partition or not partition.get("layers"):
        raise ValueError("the matched run has no partition report (summary.partition.layers); "
                         "match a finished PAD run")
    targets = {}
    for row in partition["layers"]:
        count, entries = row.get("dynamic_entries"), row.get("entries")
        if not isinstance(count, int) or not isinstance(entries, int) or not 0 <= count <= entries:
            raise ValueError(f"bad partition row for layer {row.get('name')!r}: dynamic_entries={count!r}, "
                             f"entries={entries!r}")
        targets[row["name"]] = count
    return targets


def matched_ratio(record: dict[str, Any]) -> float:
    """The matched run's achieved global kappa, ``sum(c_l) / N`` (exact, so the global top-k takes ``sum(c_l)``)."""
    rows = record.get("summary", record)["partition"]["layers"]
    return sum(r["dynamic_entries"] for r in rows) / sum(r["entries"] for r in rows)


def matched_scores(model: nn.Module, targets: dict[str, int], seed: int) -> dict[tuple[str, str], Tensor]:
    """Scores ``{(layer, group): Tensor[group.shape]}``: in each layer ``c_l`` random entries (over all its
    groups together) score in [1, 1.5), every other entry in [0, 0.5). Deterministic given ``seed``."""
    layers = dict(pad_layers(model))
    if set(layers) != set(targets):
        raise ValueError(f"matched run's layers {sorted(targets)} differ from this model's {sorted(layers)}")
    gen = torch.Generator().manual_seed(int(seed))
    scores: dict[tuple[str, str], Tensor] = {}
    for name, layer in layers.items():
        groups: list[ModeGroup] = layer.mode_groups()
        sizes = [g.mask.numel() for g in groups]
        total = sum(sizes)
        if targets[name] > total:
            raise ValueError(f"layer {name}: target {targets[name]} dynamic entries > its {total} entries")
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=gen)[: targets[name]]] = True
        values = torch.rand(total, generator=gen, dtype=torch.float64) * 0.5 + chosen.double()
        for g, part in zip(groups, values.split(sizes)):
            scores[(name, g.name)] = part.reshape(g.mask.shape)
    return scores


@contextmanager
def prepared_scores(model: nn.Module, targets: dict[str, int], seed: int) -> Iterator[None]:
    """Within the block, the ``matched_random`` criterion scores ``model``'s layers by :func:`matched_scores`."""
    layers = dict(pad_layers(model))
    scores = matched_scores(model, targets, seed)
    _ACTIVE.clear()
    _ACTIVE.update({(id(layers[n]), g): s for (n, g), s in scores.items()})
    try:
        yield
    finally:
        _ACTIVE.clear()


def check_counts(report: dict[str, Any], targets: dict[str, int]) -> None:
    """Raise unless the partition report's per-layer dynamic counts equal ``targets`` exactly."""
    got = {row["name"]: row["dynamic_entries"] for row in report["layers"]}
    if got != targets:
        bad = {n: (got.get(n), c) for n, c in targets.items() if got.get(n) != c}
        raise RuntimeError(f"matched random partition missed the per-layer targets (got, wanted): {bad}")


def _criterion(group: ModeGroup, stats, layer: nn.Module, **kwargs) -> Tensor:
    key = (id(layer), group.name)
    if key not in _ACTIVE:
        raise RuntimeError(f"criterion {CRITERION!r} is only usable through experiments/matched_random.py "
                           "(no scores were prepared for this layer)")
    return _ACTIVE[key].to(device=group.mask.device, dtype=group.mask.dtype)


def register() -> None:
    """Register the ``matched_random`` criterion (data-free, not monotone); idempotent."""
    register_criterion(CRITERION, _criterion, needs_data=False, monotone=False, symmetric_zero=False,
                       stochastic=True, overwrite=True)


class MatchedRandomTrainer(Trainer):
    """padnet's trainer whose partition selects the prepared per-layer-matched random entries."""

    def __init__(self, *args, targets: dict[str, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.targets = targets

    def partition(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.criterion != CRITERION or cfg.partition_iterations != 1 or cfg.partition_scope != "global":
            raise ValueError(f"matched random needs --criterion {CRITERION} --partition-iterations 1 "
                             f"--partition-scope global (got {cfg.criterion}, {cfg.partition_iterations}, "
                             f"{cfg.partition_scope})")
        with prepared_scores(self.model, self.targets, cfg.seed):
            report = super().partition()
        check_counts(report, self.targets)
        report["matched_targets"] = dict(self.targets)
        return report


def main(argv: list[str] | None = None) -> int:
    from padnet.commands.train import add_train_args, resolve_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--match", required=True, type=Path, help="result file (or summary.json) of the run to match")
    add_train_args(p)
    args = p.parse_args(argv)
    match_path: Path = args.match
    del args.match  # not a training setting: the rest of the namespace is exactly padnet train's
    record = json.loads(match_path.read_text())
    targets = matched_targets(record)
    register()
    cfg: TrainConfig = resolve_from_args(args)
    if cfg.nproc > 1:
        p.error("matched random runs in one process (--nproc 1)")
    if cfg.variant != "pad":
        p.error("matched random needs --variant pad")
    if abs(cfg.ratio - matched_ratio(record)) > 1e-12:
        p.error(f"--ratio {cfg.ratio!r} must be the matched run's achieved kappa {matched_ratio(record)!r}")
    cfg.validate()
    if not args.resume:
        resolve_paths(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = D.setup(cfg.device)
    try:
        MatchedRandomTrainer(cfg, ctx, resume=args.resume, overwrite=args.overwrite, targets=targets).run()
    finally:
        D.teardown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
