"""Tables, paired comparisons and plots of the reproduction study (docs/results.md).

    python experiments/report.py

Reads ``experiments/results/*.json`` (from ``study.py`` and ``speed.py``),
rewrites the generated part of ``docs/results.md`` (between the
``<!-- generated -->`` markers) and the figures in ``docs/figures/``.
Everything here is computed from the committed result files; nothing is typed in.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "figures"
BEGIN, END = "<!-- generated: begin (experiments/report.py) -->", "<!-- generated: end -->"

LABELS = {
    "fm-static": "static", "fm-dynamic": "fully dynamic (K=4)",
    "fm-pad-k0.1": "PAD kappa=0.1", "fm-pad-k0.3": "PAD kappa=0.3", "fm-pad-k0.5": "PAD kappa=0.5",
    "fm-pad-k0.7": "PAD kappa=0.7",
    "fm-pad-k0.3-magnitude": "PAD kappa=0.3, magnitude", "fm-pad-k0.3-random": "PAD kappa=0.3, random",
    "fm-pad-k0.3-noscale": "PAD kappa=0.3, taylor, no scale factors",
    "text-static": "static (dense FFN)", "text-moe": "MoE (4 experts, top-2)", "text-pad-k0.5": "PAD-MoE kappa=0.5",
}
VISION_ORDER = ["fm-static", "fm-dynamic", "fm-pad-k0.1", "fm-pad-k0.3", "fm-pad-k0.5", "fm-pad-k0.7"]
ABLATION_ORDER = ["fm-pad-k0.3", "fm-pad-k0.3-magnitude", "fm-pad-k0.3-random", "fm-pad-k0.3-noscale"]
TEXT_ORDER = ["text-static", "text-moe", "text-pad-k0.5"]


def load_runs() -> dict[str, dict[int, dict]]:
    """``{condition: {seed: record}}`` from the per-run result files."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(RESULTS.glob("*.json")):
        if path.name == "speed.json":
            continue
        record = json.loads(path.read_text())
        condition = re.sub(r"-s\d+$", "", record["name"])
        runs[condition][record["seed"]] = record
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def acc(record: dict) -> float:
    return 100.0 * record["summary"]["test_accuracy"]


def fmt_pm(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def paired(a: dict[int, dict], b: dict[int, dict]) -> dict | None:
    """Paired difference ``a - b`` (accuracy points) over the seeds both have; t-test on the differences."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [acc(a[s]) - acc(b[s]) for s in seeds]
    m = statistics.fmean(diffs)
    out = {"n": len(diffs), "diffs": diffs, "mean": m, "wins": sum(d > 0 for d in diffs)}
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        out["std"] = sd
        if sd > 0:
            from scipy import stats

            t = m / (sd / math.sqrt(len(diffs)))
            out["t"] = t
            out["p"] = float(2 * stats.t.sf(abs(t), len(diffs) - 1))
    return out


def paired_row(name: str, result: dict | None) -> str:
    if result is None:
        return f"| {name} | – | – | – | – |"
    diffs = ", ".join(f"{d:+.2f}" for d in result["diffs"])
    p = f"{result['p']:.3f}" if "p" in result else "–"
    std = f" ± {result['std']:.2f}" if "std" in result else ""
    return f"| {name} | {diffs} | {result['mean']:+.2f}{std} | {result['wins']}/{result['n']} | {p} |"


def condition_table(runs, order, speed) -> list[str]:
    rows = ["| model | seeds | test accuracy % (mean ± std) | deployable params | of which dynamic | "
            "FLOPs / sample | train s / run | inference time vs static (B=64 / B=1) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cond in order:
        if cond not in runs:
            rows.append(f"| {LABELS[cond]} | 0 | not run | | | | | |")
            continue
        recs = [runs[cond][s] for s in sorted(runs[cond])]
        s0 = recs[0]["summary"]
        params = s0["params"]
        flops = s0.get("flops")
        train_s = statistics.median(r["summary"]["train_seconds"] for r in recs)
        sp = speed.get("rows", {}).get(cond) if speed else None
        sp_text = f"{sp['batch_ratio']:.2f}x / {sp['batch1_ratio']:.2f}x" if sp else "–"
        flops_text = f"{flops / 1e6:.1f} M" if flops else "–"
        rows.append(
            f"| {LABELS[cond]} | {len(recs)} | {fmt_pm([acc(r) for r in recs])} | {params['total'] / 1e6:.3f} M | "
            f"{params['dynamic'] / 1e6:.3f} M | {flops_text} | {train_s:.0f} | {sp_text} |")
    return rows


def per_seed_table(runs, order) -> list[str]:
    seeds = sorted({s for c in order if c in runs for s in runs[c]})
    if not seeds:
        return ["(no finished runs yet)"]
    rows = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for cond in order:
        if cond in runs:
            rows.append(f"| {LABELS[cond]} | " + " | ".join(
                f"{acc(runs[cond][s]):.2f}" if s in runs[cond] else "–" for s in seeds) + " |")
    return rows


def plot(runs) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    kappas = [(k, f"fm-pad-k{k}") for k in (0.1, 0.3, 0.5, 0.7) if f"fm-pad-k{k}" in runs]
    if kappas:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [k for k, _ in kappas]
        stats_ = [mean_std([acc(r) for r in runs[c].values()]) for _, c in kappas]
        ax.errorbar(xs, [m for m, _ in stats_], yerr=[0 if math.isnan(s) else s for _, s in stats_],
                    marker="o", capsize=4, color="C0", label="PAD (taylor IMP, learned scales)")
        for c in kappas:
            ax.scatter([c[0]] * len(runs[c[1]]), [acc(r) for r in runs[c[1]].values()], color="C0", alpha=0.3, s=12)
        for cond, color in (("fm-static", "C2"), ("fm-dynamic", "C3")):
            if cond in runs:
                m, s = mean_std([acc(r) for r in runs[cond].values()])
                ax.axhline(m, color=color, label=f"{LABELS[cond]} (mean; band ± std)")
                if not math.isnan(s):
                    ax.axhspan(m - s, m + s, color=color, alpha=0.12)
        ax.set_xlabel("dynamic ratio kappa")
        ax.set_ylabel("Fashion-MNIST test accuracy (%)")
        ax.set_title("Accuracy vs dynamic ratio (3 seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(FIGURES / "accuracy_vs_kappa.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_kappa.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, cond in enumerate(VISION_ORDER):
            if cond not in runs:
                continue
            recs = list(runs[cond].values())
            m, s = mean_std([acc(r) for r in recs])
            x = recs[0]["summary"]["params"]["total"] / 1e6
            ax.errorbar([x], [m], yerr=[0 if math.isnan(s) else s], marker="o", capsize=4, color=f"C{i}",
                        label=LABELS[cond])
        ax.set_xlabel("deployable parameters (M)")
        ax.set_ylabel("Fashion-MNIST test accuracy (%)")
        ax.set_title("Accuracy vs deployable size")
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(FIGURES / "accuracy_vs_params.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_params.png")
    text = [c for c in TEXT_ORDER if c in runs]
    if text:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, cond in enumerate(text):
            vals = [acc(r) for r in runs[cond].values()]
            m, s = mean_std(vals)
            ax.bar(i, m, yerr=0 if math.isnan(s) else s, capsize=4, color=f"C{i}", alpha=0.7)
            ax.scatter([i] * len(vals), vals, color="k", s=10)
        ax.set_xticks(range(len(text)), [LABELS[c] for c in text], fontsize=8)
        lo = min(acc(r) for c in text for r in runs[c].values())
        ax.set_ylim(lo - 2, None)
        ax.set_ylabel("movie-sentiment test accuracy (%)")
        fig.tight_layout()
        fig.savefig(FIGURES / "text_accuracy.png", dpi=120)
        plt.close(fig)
        written.append("text_accuracy.png")
    return written


def generated_markdown(runs, speed) -> str:
    out = ["### Vision: Fashion-MNIST, ResNet-10 (width 0.5)", ""]
    out += condition_table(runs, VISION_ORDER, speed) + [""]
    out += ["Per seed (test accuracy %):", ""] + per_seed_table(runs, VISION_ORDER) + [""]
    out += ["### Partition method and scale factors (kappa = 0.3)", ""]
    out += condition_table(runs, ABLATION_ORDER, {}) + [""]
    out += ["Per seed:", ""] + per_seed_table(runs, ABLATION_ORDER) + [""]
    out += ["### Text: movie sentiment, MiniLM-L6", ""]
    out += condition_table(runs, TEXT_ORDER, {}) + [""]
    out += ["Per seed:", ""] + per_seed_table(runs, TEXT_ORDER) + [""]
    out += ["### Paired comparisons (runs with the same seed are paired)", "",
            "Differences in test-accuracy points, A - B per seed; p from a two-sided paired t-test "
            "(n = 3 seeds, 2 degrees of freedom: only large, consistent effects reach p < 0.05).", "",
            "| A - B | per seed | mean ± std | A wins | p |", "|---|---|---:|---:|---:|"]
    pairs = [(f"fm-pad-k{k}", "fm-dynamic") for k in (0.1, 0.3, 0.5, 0.7)]
    pairs += [(f"fm-pad-k{k}", "fm-static") for k in (0.1, 0.3, 0.5, 0.7)]
    pairs += [("fm-dynamic", "fm-static"), ("fm-pad-k0.3", "fm-pad-k0.3-random"),
              ("fm-pad-k0.3", "fm-pad-k0.3-magnitude"), ("fm-pad-k0.3", "fm-pad-k0.3-noscale"),
              ("text-pad-k0.5", "text-moe"), ("text-pad-k0.5", "text-static"), ("text-moe", "text-static")]
    for a, b in pairs:
        if a in runs and b in runs:
            out.append(paired_row(f"{LABELS[a]} - {LABELS[b]}", paired(runs[a], runs[b])))
    out.append("")
    if speed:
        m = speed["machine"]
        out += [f"Inference times: `{speed['command']}` (seed-0 models, `padnet.compact_` deploy form; "
                f"load {m['load_1m']} before, {speed.get('machine_after', {}).get('load_1m', '?')} after; "
                f"{m['torch_threads']} threads). Static model: "
                f"{speed['rows']['fm-static']['batch_ms']:.2f} ms at batch {speed['batch']}, "
                f"{speed['rows']['fm-static']['batch1_ms']:.2f} ms at batch 1.", ""]
    figs = plot(runs)
    for f in figs:
        out.append(f"![{f}](figures/{f})")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    runs = load_runs()
    speed_path = RESULTS / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    body = generated_markdown(runs, speed)
    text = DOC.read_text() if DOC.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")
    print(f"updated {DOC} ({sum(len(v) for v in runs.values())} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
