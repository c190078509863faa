"""Files of a run directory: JSON helpers, ``report.md``, ``curves.png``, ``modes.png``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..serialization import atomic_write

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
REPORT = "report.md"
CURVES = "curves.png"
MODES = "modes.png"
LOG = "train.log"
EVALUATION = "evaluation.json"

# Everything a run writes (``--overwrite`` removes exactly these).
RUN_FILES = (CONFIG, METRICS, SUMMARY, MODEL, REPORT, CURVES, MODES, LOG, EVALUATION,
             "checkpoint.pt", "checkpoint.prev.pt", "compact.safetensors")


def publish(path: str | Path) -> None:
    """Give a file written through a private temporary file the usual permissions (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:  # pragma: no cover
        pass


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    publish(path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------ formatting


def fmt_int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{100.0 * float(x):.2f}%"


def fmt_flops(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_seconds(s: Any) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


# --------------------------------------------------------------------- report


def render_report(summary: dict[str, Any], metrics: list[dict[str, Any]], notes: list[str]) -> str:
    cfg = summary.get("config", {})
    variant = summary["variant"]
    title = f"{summary['recipe']} / {cfg.get('model')} (width {cfg.get('width')}) / {variant}"
    if summary.get("ratio") is not None:
        title += f" kappa={summary['ratio']}"
    lines = [f"# padnet training run: {title}", ""]
    lines += [
        f"- test accuracy: **{fmt_pct(summary['test_accuracy'])}** (best {fmt_pct(summary['best_test_accuracy'])} "
        f"at epoch {summary.get('best_epoch')})",
        f"- epochs: {summary['epochs']}, seed {summary['seed']}, world size {summary.get('world_size', 1)}, "
        f"train samples {fmt_int(summary.get('num_train_samples'))}, test samples "
        f"{fmt_int(summary.get('num_test_samples'))}",
        f"- training time: {fmt_seconds(summary['train_seconds'])}",
        f"- FLOPs per sample: {fmt_flops(summary.get('flops'))} ({fmt_int(summary.get('flops'))})",
        "",
        "## Deployable size",
        "",
        "| model | total | static | dynamic | router | other |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, p: dict[str, Any] | None) -> None:
        if p:
            lines.append(f"| {label} | {fmt_int(p['total'])} | {fmt_int(p['static'])} | {fmt_int(p['dynamic'])} | "
                         f"{fmt_int(p['router'])} | {fmt_int(p['other'])} |")

    row("static model", summary.get("params_static"))
    if variant != "static":
        row("fully dynamic (kappa=1)", summary.get("params_fully_dynamic"))
    row(f"**this run ({variant})**", summary.get("params"))
    lines.append("")
    part = summary.get("partition")
    if part:
        lines += [
            "## Mode partition",
            "",
            f"- criterion {part['criterion']}, {part['iterations']} iteration(s), schedule {part['schedule']}, "
            f"scope {part['scope']}, granularity {part['granularity']}, {part['num_batches']} batch(es), "
            f"{part['seconds']:.1f} s",
            f"- dynamic ratio: target {part['target_ratio']}, achieved {part['ratio']:.4f} "
            f"({fmt_int(part['dynamic_entries'])} of {fmt_int(part['entries'])} entries)",
            f"- partitioned at step {summary.get('partition_step', 0)}",
        ]
        if part.get("loss_after") is not None:
            tr = part.get("transition") or {}
            lines.append(f"- loss on the partition batches {part['loss_before']:.4f} -> {part['loss_after']:.4f} "
                         f"({'function-preserving transitions' if part.get('preserve') else 'masks only'}: "
                         f"{fmt_int(tr.get('to_static', 0))} entries to static, "
                         f"{fmt_int(tr.get('to_dynamic', 0))} to dynamic, "
                         f"{fmt_int(tr.get('optimizer_entries_reset', 0))} optimizer entries reset)")
        for w in part.get("warnings", []):
            lines.append(f"- warning: {w}")
        lines.append("")
    lines += ["## Per epoch", "",
              "| epoch | train loss | train acc | test loss | test acc | lr | temperature | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in metrics:
        temp = "-" if m.get("temperature") is None else f"{m['temperature']:.2f}"
        lines.append(f"| {m['epoch']} | {m['train_loss']:.4f} | {fmt_pct(m['train_accuracy'])} | "
                     f"{m['test_loss']:.4f} | "
                     f"{fmt_pct(m['test_accuracy'])} | {m['lr']:.5f} | {temp} | {m['seconds']:.1f} |")
    lines.append("")
    last = metrics[-1] if metrics else {}
    if last.get("routing"):
        lines += ["## Routing (last epoch, test inputs)", "",
                  "Does each dynamic layer route input-dependently? `pi std`: standard deviation of the routing "
                  "weights over inputs (0 = the same kernel for every input); `entropy`: normalised (1 = uniform); "
                  "`kernel spread`: mean pairwise cosine distance of the live dynamic factors.", "",
                  "| layer | pi std | entropy | kernel spread |", "|---|---:|---:|---:|"]
        for name, r in last["routing"].items():
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(r.get('pi_std'))} | {fmt(r.get('entropy_normalized'))} | "
                         f"{fmt(r.get('kernel_spread'))} |")
        lines.append("")
    lines += ["## Files", ""]
    for f in summary.get("files", []):
        lines.append(f"- `{f}`")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(path: str | Path, metrics: list[dict[str, Any]], title: str) -> None:
    """Loss and accuracy per epoch (train and test)."""
    fig = _figure(10, 4)
    epochs = [m["epoch"] for m in metrics]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax1.plot(epochs, [m["test_loss"] for m in metrics], "s-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * m["train_accuracy"] for m in metrics], "o-", label="train")
    ax2.plot(epochs, [100 * m["test_accuracy"] for m in metrics], "s-", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    publish(path)


def plot_modes(path: str | Path, layer_ratios: dict[str, float], title: str, overall: float | None = None) -> None:
    """Dynamic ratio (kappa) per PAD layer, with the overall (entry-weighted) ratio as a line."""
    names = list(layer_ratios)
    fig = _figure(max(6.0, 0.45 * len(names) + 2), 4.5)
    ax = fig.subplots(1, 1)
    ax.bar(range(len(names)), [layer_ratios[n] for n in names], color="tab:orange")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("dynamic ratio (kappa)")
    ax.set_title(title)
    if names and overall is not None and math.isfinite(overall):
        ax.axhline(overall, color="gray", ls="--", lw=1, label=f"overall kappa {overall:.3f} (all entries)")
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    publish(path)


def markdown_table(rows: list[list[str]], header: list[str], align_right: set[int] | None = None) -> str:
    align_right = align_right or set()
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i in align_right else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
