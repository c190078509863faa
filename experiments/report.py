"""Tables, paired comparisons and plots of the reproduction study (docs/results.md).

    python experiments/report.py

Reads ``experiments/results/*.json`` (first study, from ``study.py --study first`` and ``speed.py``) and
``experiments/results/study2/<setting>/*.json`` (second study), rewrites the two generated parts of
``docs/results.md`` (between the ``<!-- generated ... -->`` markers) and the figures in ``docs/figures/``.
Arms and seeds without a result file are reported as not run.
Everything here is computed from the committed result files; nothing is typed in.
"""

from __future__ import annotations

import json
import math
import os
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
        if "name" not in record or "seed" not in record:  # not a study run (e.g. transitions-partition-*.json)
            continue
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


def paired_row(name: str, result: dict | None, p_holm: float | None = None) -> str:
    if result is None:
        return f"| {name} | – | – | – | – | – |"
    diffs = ", ".join(f"{d:+.2f}" for d in result["diffs"])
    p = f"{result['p']:.3f}" if "p" in result else "–"
    std = f" ± {result['std']:.2f}" if "std" in result else ""
    holm_text = "–" if p_holm is None else f"{p_holm:.3f}"
    return f"| {name} | {diffs} | {result['mean']:+.2f}{std} | {result['wins']}/{result['n']} | {p} | {holm_text} |"


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
            "(n = 3 seeds, 2 degrees of freedom: only large, consistent effects reach p < 0.05); "
            "Holm p: corrected over all comparisons in this table (added for issue 16).", "",
            "| A - B | per seed | mean ± std | A wins | p | Holm p |", "|---|---|---:|---:|---:|---:|"]
    pairs = [(f"fm-pad-k{k}", "fm-dynamic") for k in (0.1, 0.3, 0.5, 0.7)]
    pairs += [(f"fm-pad-k{k}", "fm-static") for k in (0.1, 0.3, 0.5, 0.7)]
    pairs += [("fm-dynamic", "fm-static"), ("fm-pad-k0.3", "fm-pad-k0.3-random"),
              ("fm-pad-k0.3", "fm-pad-k0.3-magnitude"), ("fm-pad-k0.3", "fm-pad-k0.3-noscale"),
              ("text-pad-k0.5", "text-moe"), ("text-pad-k0.5", "text-static"), ("text-moe", "text-static")]
    tested = {(a, b): paired(runs[a], runs[b]) for a, b in pairs if a in runs and b in runs}
    adjusted = holm({f"{a}|{b}": (r or {}).get("p") for (a, b), r in tested.items()})
    for (a, b), result in tested.items():
        out.append(paired_row(f"{LABELS[a]} - {LABELS[b]}", result, adjusted[f"{a}|{b}"]))
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


# ------------------------------------------------------------------ second study (issue 16)
BEGIN2, END2 = "<!-- generated study2: begin (experiments/report.py) -->", "<!-- generated study2: end -->"
STUDY2 = RESULTS / "study2"
NI_MARGIN = 0.2  # accuracy points: PAD "no worse than" B means mean(PAD - B) > -0.2
ALPHA = 0.025  # one-sided, family-wise over the primary questions (Holm): matches a two-sided 95 % interval
PRIMARY = [  # (key, question, A, B, kind): Holm-corrected together
    ("a", "PAD (IMP at init) >= fully dynamic", "imp-init", "dynamic", "noninferiority"),
    ("b", "PAD (IMP at init) >= static", "imp-init", "static", "noninferiority"),
    ("c", "IMP > random with IMP's per-layer counts", "imp-init", "random-matched", "superiority"),
]
SECONDARY = [  # exploratory: unadjusted, two-sided
    ("re-partition vs IMP at init", "repartition", "imp-init"),
    ("learned gates vs IMP at init", "gates", "imp-init"),
    ("IMP after warm-up vs IMP at init", "imp-warmup", "imp-init"),
    ("IMP at init vs random uniform", "imp-init", "random-uniform"),
    ("random matched vs random uniform (allocation alone)", "random-matched", "random-uniform"),
    ("fully dynamic vs static", "dynamic", "static"),
]
TEXT2_COMPARISONS = [
    ("PAD-MoE (IMP) vs MoE", "pad-imp", "moe"), ("PAD-MoE (IMP) vs static", "pad-imp", "static"),
    ("PAD-MoE (gates) vs PAD-MoE (IMP)", "pad-gates", "pad-imp"), ("MoE vs static", "moe", "static"),
]


def _study_module():
    import importlib.util
    import sys

    name = "experiments_study_for_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def paired_test(diffs: list[float], kind: str = "two-sided", margin: float = 0.0,
                level: float = 0.95) -> dict:
    """Paired t statistics of per-seed differences ``diffs`` (A - B, points).

    ``ci``: two-sided ``level`` t interval of the mean difference. ``p``: ``kind`` = "superiority"
    (H0: mean <= 0), "noninferiority" (H0: mean <= -margin) -- one-sided -- or "two-sided" (H0: mean = 0).
    ``p`` and ``ci`` are None with fewer than 2 differences or zero spread (no t distribution to refer to).
    """
    from scipy import stats

    n = len(diffs)
    out = {"n": n, "diffs": list(diffs), "mean": statistics.fmean(diffs) if n else float("nan"),
           "sd": None, "ci": None, "p": None, "kind": kind, "margin": margin}
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    out["sd"] = sd
    if sd == 0:
        return out
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    out["ci"] = (out["mean"] - half, out["mean"] + half)
    if kind == "superiority":
        out["p"] = float(stats.t.sf(out["mean"] / se, n - 1))
    elif kind == "noninferiority":
        out["p"] = float(stats.t.sf((out["mean"] + margin) / se, n - 1))
    elif kind == "two-sided":
        out["p"] = float(2 * stats.t.sf(abs(out["mean"]) / se, n - 1))
    else:
        raise ValueError(f"unknown test kind {kind!r}: superiority | noninferiority | two-sided")
    return out


MAX_SIGN_FLIP_SEEDS = 20  # 2**20 sign patterns: the exact enumeration stays small


def sign_flip_p(diffs: list[float], shift: float = 0.0) -> float | None:
    """Exact one-sided paired sign-flip (permutation) p-value for H0: the differences ``diffs + shift`` are
    symmetric about 0, against larger values: the share of the 2**n sign patterns whose mean is >= the
    observed one. ``shift`` is the non-inferiority margin (0 for superiority). No normality assumption;
    with n seeds the smallest possible p is 2**-n (1/32 = 0.031 for 5 seeds). None with no differences.
    """
    n = len(diffs)
    if n == 0:
        return None
    if n > MAX_SIGN_FLIP_SEEDS:
        raise ValueError(f"sign_flip_p enumerates 2**n patterns; {n} differences exceed {MAX_SIGN_FLIP_SEEDS}")
    values = [d + shift for d in diffs]
    observed = sum(values)
    tol = 1e-9 * max(1.0, sum(abs(v) for v in values))  # ties (e.g. a zero difference) count as >=
    hits = 0
    for pattern in range(2 ** n):
        total = sum(-v if pattern >> i & 1 else v for i, v in enumerate(values))
        hits += total >= observed - tol
    return hits / 2 ** n


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm step-down adjusted p-values over the family ``pvalues`` (None = not testable, left out of the
    family size: only the questions with data are corrected together)."""
    ordered = sorted((p, k) for k, p in pvalues.items() if p is not None)
    m, running, out = len(ordered), 0.0, {k: None for k in pvalues}
    for i, (p, k) in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def load_study2(root: Path | None = None) -> dict[str, dict[str, dict[int, dict]]]:
    """``{setting: {arm: {seed: record}}}`` from ``experiments/results/study2/<setting>/*.json``."""
    root = STUDY2 if root is None else root
    out: dict[str, dict[str, dict[int, dict]]] = {}
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(d.glob("*.json")):
            record = json.loads(path.read_text())
            arm = record.get("arm") or re.sub(r"^(fm2|text2)-|-s\d+$", "", record["name"])
            out.setdefault(d.name, {}).setdefault(arm, {})[int(record["seed"])] = record
    return out


def _diffs(runs: dict[str, dict[int, dict]], a: str, b: str) -> tuple[list[int], list[float]]:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    return seeds, [acc(runs[a][s]) - acc(runs[b][s]) for s in seeds]


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def _fmt_ci(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def primary_rows(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """The three primary questions: per-seed differences, 95 % CI, one-sided and Holm p, verdict, the Bonferroni
    simultaneous interval (``ci_simultaneous``) and the exact sign-flip p (``p_sign_flip``)."""
    rows = []
    for key, question, a, b, kind in PRIMARY:
        seeds, diffs = _diffs(runs, a, b)
        margin = NI_MARGIN if kind == "noninferiority" else 0.0
        r = paired_test(diffs, kind, margin)
        rows.append({"key": key, "question": question, "a": a, "b": b, "seeds": seeds, **r,
                     "p_sign_flip": sign_flip_p(diffs, margin)})
    adjusted = holm({r["key"]: r["p"] for r in rows})
    m = sum(r["p"] is not None for r in rows)  # the Holm family: questions with a test
    for r in rows:
        r["p_holm"] = adjusted[r["key"]]
        # Bonferroni simultaneous interval: two-sided 1 - 0.05 / m, i.e. one-sided ALPHA / m per lower end
        r["ci_simultaneous"] = paired_test(r["diffs"], "two-sided", level=1 - 2 * ALPHA / m)["ci"] if m else None
        if r["n"] == 0:
            r["verdict"] = "not yet run"
        elif r["p_holm"] is None:
            r["verdict"] = f"not testable yet ({r['n']} paired seed(s))"
        elif r["p_holm"] < ALPHA:
            r["verdict"] = "shown"
        else:
            r["verdict"] = "not shown"
    return rows


def _arm_table(runs, arms: dict[str, tuple], seeds: tuple[int, ...]) -> list[str]:
    rows = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | train acc % (mean) "
            "| deployable params | of which dynamic | train s / run (median) |",
            "|---|" + "---:|" * (len(seeds) + 5)]
    for arm, spec in arms.items():
        got = runs.get(arm, {})
        cells = [f"{acc(got[s]):.2f}" if s in got else "not run" for s in seeds]
        if got:
            recs = [got[s] for s in sorted(got)]
            p = recs[0]["summary"].get("params", {})
            secs = [r["summary"].get("train_seconds") for r in recs if r["summary"].get("train_seconds")]
            train = [100 * r["summary"]["train_accuracy"] for r in recs
                     if r["summary"].get("train_accuracy") is not None]
            tail = [fmt_pm([acc(r) for r in recs]),
                    f"{statistics.fmean(train):.2f}" if train else "–",
                    f"{p['total'] / 1e6:.3f} M" if "total" in p else "–",
                    f"{p['dynamic'] / 1e6:.3f} M" if "dynamic" in p else "–",
                    f"{statistics.median(secs):.0f}" if secs else "–"]
        else:
            tail = ["not run", "–", "–", "–", "–"]
        rows.append(f"| {spec[0]} | " + " | ".join(cells + tail) + " |")
    return rows


def summary_lines(runs: dict[str, dict[int, dict]], arms: dict[str, tuple], seeds: tuple[int, ...]) -> list[str]:
    """The figures the verdict rests on, as generated bullets (so that prose never has to restate a number):
    completeness, the spread of the arms' means over the seeds every arm has, each primary question, fully
    dynamic vs static, the end-of-training routing range and the training accuracies."""
    complete = [s for s in seeds if all(s in runs.get(a, {}) for a in arms)]
    n_runs = sum(len(v) for v in runs.values())
    out = [f"- Runs: {n_runs} of {len(arms) * len(seeds)}; seeds with all {len(arms)} arms: "
           + (", ".join(map(str, complete)) or "none") + "."]
    if complete:
        means = {a: statistics.fmean(acc(runs[a][s]) for s in complete) for a in arms}
        lo, hi = min(means, key=means.get), max(means, key=means.get)
        out.append(f"- Mean test accuracy over those seeds: {means[lo]:.2f} % ({arms[lo][0]}) to "
                   f"{means[hi]:.2f} % ({arms[hi][0]}), a spread of {means[hi] - means[lo]:.2f} points.")
    for r in primary_rows(runs):
        if not r["n"]:
            out.append(f"- ({r['key']}) {r['question']}: not yet run.")
            continue
        kind = (f" (non-inferiority, margin {NI_MARGIN})" if r["kind"] == "noninferiority" else " (superiority)")
        out.append(f"- ({r['key']}) {r['question']}{kind}: **{r['verdict']}** over {r['n']} paired seeds: mean "
                   f"{r['mean']:+.2f}, 95 % CI {_fmt_ci(r['ci'])}, simultaneous {_fmt_ci(r['ci_simultaneous'])}, "
                   f"one-sided p {_fmt_p(r['p'])}, Holm p {_fmt_p(r['p_holm'])}; "
                   f"{sum(d > 0 for d in r['diffs'])} of {r['n']} seeds positive.")
    _, diffs = _diffs(runs, "dynamic", "static")
    if diffs:
        t = paired_test(diffs, "two-sided")
        out.append(f"- Fully dynamic - static: {t['mean']:+.2f} points, 95 % CI {_fmt_ci(t['ci'])} "
                   f"({len(diffs)} seeds, two-sided p {_fmt_p(t['p'])}).")
    lasts = [r["metrics"][-1] for a in arms for r in runs.get(a, {}).values()
             if r.get("metrics") and r["metrics"][-1].get("routing_entropy") is not None]
    if lasts:
        ent = [m["routing_entropy"] for m in lasts]
        std = [m["routing_std"] for m in lasts if m.get("routing_std") is not None]
        out.append(f"- Routing at the end of training, every dynamic run ({len(lasts)}): normalised entropy "
                   f"{min(ent):.3f}-{max(ent):.3f}" + (f", pi std (mean over layers) {min(std):.3f}-{max(std):.3f}"
                                                       if std else "") + ".")
    train = {a: [100 * r["summary"]["train_accuracy"] for r in runs.get(a, {}).values()
                 if r["summary"].get("train_accuracy") is not None] for a in ("static", "dynamic")}
    if all(train.values()):
        out.append(f"- Training accuracy (last epoch, mean): static {statistics.fmean(train['static']):.2f} %, "
                   f"fully dynamic {statistics.fmean(train['dynamic']):.2f} %.")
    return out + [""]


def routing_end_rows(runs: dict[str, dict[int, dict]], arms: dict[str, tuple]) -> list[str]:
    """Markdown table of the last epoch's routing per arm (mean over seeds): normalised entropy, the
    spread of the routing weights over test inputs (mean and largest layer) and the kernel spread.
    Arms whose runs logged no routing (static) are left out; empty list when none did."""
    rows = []
    for arm, spec in arms.items():
        lasts = [r["metrics"][-1] for r in runs.get(arm, {}).values() if r.get("metrics")]
        lasts = [m for m in lasts if m.get("routing_entropy") is not None]
        if not lasts:
            continue
        per_layer_max = [max((v["pi_std"] for v in m["routing"].values() if v.get("pi_std") is not None),
                             default=None) for m in lasts if m.get("routing")]
        per_layer_max = [v for v in per_layer_max if v is not None]

        def mean(field):
            vals = [m[field] for m in lasts if m.get(field) is not None]
            return f"{statistics.fmean(vals):.3f}" if vals else "–"

        rows.append(f"| {spec[0]} | {len(lasts)} | {mean('routing_entropy')} | {mean('routing_std')} | "
                    + (f"{statistics.fmean(per_layer_max):.3f}" if per_layer_max else "–")
                    + f" | {mean('kernel_spread')} |")
    if not rows:
        return []
    return ["Routing at the end of training (last epoch, on the test set; mean over seeds of the mean over "
            "layers). Entropy is normalised by log K (1 = uniform weights 1/K for every input); pi std is the "
            "standard deviation of each routing weight over inputs (0 = the same kernel for every input); "
            "kernel spread is the mean pairwise cosine distance of the K live dynamic kernels:", "",
            "| arm | seeds | routing entropy (normalised) | pi std (mean over layers) | pi std (largest layer) "
            "| kernel spread |", "|---|---:|---:|---:|---:|---:|"] + rows + [""]


def allocation_rows(runs: dict[str, dict[int, dict]], arms: dict[str, tuple]) -> list[str]:
    """Markdown table of each dynamic arm's final dynamic fraction per layer (``summary.layer_dynamic_ratios``,
    mean over seeds, in %): where each partition method puts the dynamic entries. Empty when no run has it."""
    per_arm = {}
    for arm in arms:
        ratios = [r["summary"]["layer_dynamic_ratios"] for r in runs.get(arm, {}).values()
                  if r.get("summary", {}).get("layer_dynamic_ratios")]
        if ratios:
            per_arm[arm] = ratios
    if not per_arm:
        return []
    layers = list(dict.fromkeys(name for ratios in per_arm.values() for r in ratios for name in r))  # union, in order
    out = ["Final dynamic fraction per layer, % (mean over seeds; `summary.layer_dynamic_ratios`):", "",
           "| arm | seeds | " + " | ".join(f"`{name}`" for name in layers) + " |",
           "|---|---:|" + "---:|" * len(layers)]
    for arm, ratios in per_arm.items():
        cells = [f"{100 * statistics.fmean(r[name] for r in ratios if name in r):.0f}"
                 if any(name in r for r in ratios) else "–" for name in layers]
        out.append(f"| {arms[arm][0]} | {len(ratios)} | " + " | ".join(cells) + " |")
    return out + [""]


def _curve(records: list[dict], field: str) -> tuple[list[int], list[float]] | None:
    """Mean over seeds of ``field`` per epoch (epochs every record has); None when no record logs it."""
    series = [{m["epoch"]: m[field] for m in r.get("metrics", []) if m.get(field) is not None} for r in records]
    series = [s for s in series if s]
    if not series:
        return None
    epochs = sorted(set.intersection(*(set(s) for s in series)))
    return epochs, [statistics.fmean(s[e] for s in series) for e in epochs]


CURVE_FIELDS = [("train_loss", "training loss"), ("routing_entropy", "routing entropy (normalised)"),
                ("kernel_spread", "kernel spread (mean pairwise cosine distance)"),
                ("routing_std", "routing std of pi over inputs")]


def plot_curves(runs, arms: dict[str, tuple], path: Path) -> list[str]:
    """One panel per metrics field (mean over seeds per epoch, one line per arm); fields no run logs are
    left out. Returns the fields plotted."""
    panels = []
    for field_, title in CURVE_FIELDS:
        lines = {arm: _curve(list(runs[arm].values()), field_) for arm in arms if runs.get(arm)}
        lines = {a: c for a, c in lines.items() if c is not None}
        if lines:
            panels.append((field_, title, lines))
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (field_, title, lines) in zip(axes[0], panels):
        for i, (arm, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, marker="o", ms=3, color=f"C{list(arms).index(arm) % 10}", label=arms[arm][0])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f for f, _, _ in panels]


def study2_markdown(results: dict[str, dict[str, dict[int, dict]]] | None = None,
                    figures: Path | None = None) -> str:
    """The generated second-study section: every arm x seed (``not run`` where no result file exists),
    the primary questions with Holm correction, the exploratory comparisons and the curves."""
    study = _study_module()
    results = load_study2() if results is None else results
    figures = FIGURES if figures is None else figures
    default = study.Settings().tag
    settings = [s for s in results if s != "text"] or [default]
    out: list[str] = []
    for tag in settings:
        runs = results.get(tag, {})
        n_runs = sum(len(v) for v in runs.values())
        out += [f"### Vision, setting `{tag}` ({n_runs} of {len(study.ARMS2) * len(study.SEEDS2)} runs finished)", ""]
        if not n_runs:
            out += [f"Not yet run: no result files in `experiments/results/study2/{tag}/`.", ""]
        out += ["Summary (generated; the verdict above rests on these figures):", ""]
        out += summary_lines(runs, study.ARMS2, study.SEEDS2)
        out += ["Test accuracy % per seed:", ""] + _arm_table(runs, study.ARMS2, study.SEEDS2) + [""]
        out += ["`train acc` is the accuracy on the augmented training batches of the last epoch (the "
                "trainer's running figure), next to the test accuracy to show where training ended.", ""]
        out += ["`train s / run` is the training process's own wall time: it includes any time the job was "
                "paused (benchmarks stop study jobs with SIGSTOP while they time) or shared its core, so it "
                "is a budget figure, not a speed comparison between arms.", ""]
        out += ["Primary questions (paired by seed; differences A - B in accuracy points; one-sided t-tests, "
                f"non-inferiority margin {NI_MARGIN} points; Holm over the questions with data, family-wise "
                f"one-sided alpha = {ALPHA}):", "",
                "| | question | A - B per seed | mean | 95 % CI | simultaneous CI (Bonferroni) | one-sided p "
                "| Holm p | verdict | exact sign-flip p (check) |",
                "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in primary_rows(runs):
            per = ", ".join(f"{d:+.2f}" for d in r["diffs"]) or "–"
            mean = f"{r['mean']:+.2f}" if r["n"] else "–"
            out.append(f"| ({r['key']}) | {r['question']} | {per} | {mean} | {_fmt_ci(r['ci'])} | "
                       f"{_fmt_ci(r['ci_simultaneous'])} | "
                       f"{_fmt_p(r['p'])} | {_fmt_p(r['p_holm'])} | {r['verdict']} | {_fmt_p(r['p_sign_flip'])} |")
        out += ["", "The verdict uses the t-tests of the statistics plan. The last column is a check without the "
                "normality assumption: the exact one-sided sign-flip test of the same hypothesis "
                "(uncorrected). With n seeds it cannot go below 2^-n (0.031 for 5 seeds, above the "
                f"{ALPHA} level), so it can contradict the t-test but never confirm it at that level. "
                "The simultaneous interval is Bonferroni's, which is stricter than Holm after Holm's first step: "
                "a question can be shown while its simultaneous lower end is still below the margin."]
        out += ["", "Exploratory comparisons (two-sided, not corrected):", ""]
        out += _comparison_rows(runs, SECONDARY, "A - B") + [""]
        out += routing_end_rows(runs, study.ARMS2)
        out += allocation_rows(runs, study.ARMS2)
        fig = figures / f"study2_curves_{tag}.png"
        fields = plot_curves(runs, study.ARMS2, fig)
        if fields:
            missing = [f for f, _ in CURVE_FIELDS if f not in fields]
            out += [f"![curves]({os.path.relpath(fig, DOC.parent)})", ""]
            if missing:
                out += [f"(no run logged {', '.join(missing)}: left out of the figure)", ""]
        else:
            out += ["Curves: no finished runs yet.", ""]
    out += timing_markdown(STUDY2 / "timing.json", study)
    text = results.get("text", {})
    out += [f"### Text, MiniLM MoE ({sum(len(v) for v in text.values())} of "
            f"{len(study.TEXT2_ARMS) * len(study.TEXT_SEEDS2)} runs finished)", ""]
    if not text:
        out += ["Not yet run: no result files in `experiments/results/study2/text/`.", ""]
    out += _arm_table(text, study.TEXT2_ARMS, study.TEXT_SEEDS2) + [""]
    out += _comparison_rows(text, TEXT2_COMPARISONS, "A - B (two-sided, uncorrected)")
    return "\n".join(out).rstrip() + "\n"


def _comparison_rows(runs: dict, comparisons, header: str) -> list[str]:
    """Markdown table of two-sided paired comparisons ``(label, arm A, arm B)``: per-seed A - B, mean, CI, p."""
    out = [f"| {header} | per seed | mean | 95 % CI | p |", "|---|---|---:|---:|---:|"]
    for label, a, b in comparisons:
        _, diffs = _diffs(runs, a, b)
        r = paired_test(diffs, "two-sided")
        per = ", ".join(f"{d:+.2f}" for d in diffs) or "not yet run"
        mean = f"{r['mean']:+.2f}" if r["n"] else "–"
        out.append(f"| {label} | {per} | {mean} | {_fmt_ci(r['ci'])} | {_fmt_p(r['p'])} |")
    return out


def timing_markdown(path: Path, study) -> list[str]:
    """The measured step times (``study.py --measure``), labelled with the load they were taken under."""
    if not path.is_file():
        return ["Step times: not measured yet (`python experiments/study.py --study second --measure 20`).", ""]
    t = json.loads(path.read_text())
    out = [f"Step times measured {t['date']}: {t['what']}; **under load** (1-minute load average "
           f"{t['load_1m_before']:.1f} before, {t['load_1m_after']:.1f} after, on {t['cpus']} cores shared with "
           "other jobs), so slower than on a quiet machine; the budget check uses the reference step times "
           "(docs/training.md; study.py REFERENCE_STEP_SECONDS) instead:", "",
           "| arm | measured s / step (under load) | reference s / step | reference run estimate (min) |",
           "|---|---:|---:|---:|"]
    settings = study.Settings()
    for arm in study.ARMS2:
        row = t["arms"].get(arm, {})
        got = f"{row['step_seconds']:.2f}" if "step_seconds" in row else (
            "not measured (flags missing then)" if "blocked" in row else ("failed" if "failed" in row else "–"))
        ref = study.REFERENCE_STEP_SECONDS.get(arm)
        est = study.estimate_seconds(arm, settings)
        out.append(f"| {arm} | {got} | {ref:.3f} | {est / 60:.0f} |" if ref else f"| {arm} | {got} | – | – |")
    return out + [""]


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the markers {begin!r} ... {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def main() -> int:
    runs = load_runs()
    speed_path = RESULTS / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    text = DOC.read_text() if DOC.is_file() else f"# Results\n\n{BEGIN}\n{END}\n\n{BEGIN2}\n{END2}\n"
    text = replace_block(text, BEGIN, END, generated_markdown(runs, speed))
    text = replace_block(text, BEGIN2, END2, study2_markdown())
    DOC.write_text(text)
    n2 = sum(len(v) for arms in load_study2().values() for v in arms.values())
    print(f"updated {DOC} (first study: {sum(len(v) for v in runs.values())} runs; second study: {n2} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
