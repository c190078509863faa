"""The reproduction-study tooling: the run grids, result collection, matched random and the paired statistics."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


study = load_script("study")
report = load_script("report")
matched = load_script("matched_random")


def test_grid_covers_the_study_once():
    runs = study.grid()
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 36
    by_group = {g: [r for r in runs if r.group == g] for g in ("vision", "ablation", "text")}
    assert len(by_group["vision"]) == 18 and len(by_group["ablation"]) == 9 and len(by_group["text"]) == 9
    for r in runs:
        assert r.name.endswith(f"-s{r.seed}")
        assert r.seed in study.SEEDS
    kappas = sorted({float(r.args[r.args.index("--ratio") + 1]) for r in by_group["vision"] if "--ratio" in r.args})
    assert kappas == [0.1, 0.3, 0.5, 0.7]
    assert {r.args[r.args.index("--criterion") + 1] for r in by_group["ablation"] if "--criterion" in r.args} == {
        "magnitude", "random"}
    assert sum("pad_config.scale=none" in r.args for r in by_group["ablation"]) == 3


def test_command_resumes_or_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RUNS", tmp_path)
    run = study.grid()[0]
    cmd = study.command(run, threads=1)
    assert "--resume" not in cmd and "--overwrite" not in cmd
    assert cmd[cmd.index("--seed") + 1] == str(run.seed)
    run.run_dir.mkdir(parents=True)
    assert study.command(run, 1)[-1] == "--overwrite"  # started, no epoch checkpoint: start over
    (run.run_dir / "checkpoint.pt").write_bytes(b"x")
    assert study.command(run, 1)[-1] == "--resume"


def test_collect_copies_summary_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    run = study.grid()[1]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "summary.json").write_text(json.dumps({"test_accuracy": 0.5, "config": {"big": 1}}))
    (run.run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert study.execute(run, 1).startswith("collected")
    record = json.loads(run.result_path.read_text())
    assert record["summary"] == {"test_accuracy": 0.5}
    assert [m["epoch"] for m in record["metrics"]] == [1, 2]
    assert record["command"].startswith("padnet train ") and record["command"].endswith(f"--seed {run.seed}")
    assert study.execute(run, 1).startswith("skip")


def _record(acc: float) -> dict:
    return {"summary": {"test_accuracy": acc / 100}}


def test_paired_difference_and_t_test():
    a = {0: _record(80.0), 1: _record(81.0), 2: _record(83.0)}
    b = {0: _record(79.0), 1: _record(79.5), 2: _record(80.0), 3: _record(99.0)}  # seed 3 has no partner
    result = report.paired(a, b)
    diffs = [1.0, 1.5, 3.0]
    assert result["n"] == 3 and result["wins"] == 3
    assert result["diffs"] == pytest.approx(diffs)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert result["mean"] == pytest.approx(mean) and result["std"] == pytest.approx(sd)
    t = mean / (sd / math.sqrt(3))
    assert result["t"] == pytest.approx(t)
    # Student t with 2 degrees of freedom has the closed form P(|T| > t) = 1 - t / sqrt(2 + t^2)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert report.paired(a, {7: _record(1.0)}) is None



# ------------------------------------------------------------------------------------------- second study
ARMS = ["static", "imp-init", "dynamic", "imp-warmup", "random-uniform", "repartition", "gates", "random-matched"]


def _opt(args, flag):
    return args[args.index(flag) + 1]


def test_second_grid_arms_settings_and_seed_order():
    runs = study.second_grid()
    vision = [r for r in runs if r.group == "vision2"]
    text = [r for r in runs if r.group == "text2"]
    assert len({r.name for r in runs}) == len(runs) == 8 * 5 + 4 * 3
    assert [r.seed for r in vision] == sorted(r.seed for r in vision)  # seed-major
    assert [r.arm for r in vision[:8]] == ARMS  # IMP at init before its matched random (last)
    assert vision[7].match == "fm2-imp-init-s0" and vision[7].match_path.name == "fm2-imp-init-s0.json"
    for r in vision:
        a = r.args
        assert (_opt(a, "--width"), _opt(a, "--epochs"), _opt(a, "--batch-size"), _opt(a, "--lr")) == (
            "0.25", "6", "64", "0.1")
        assert (_opt(a, "--lr-schedule"), _opt(a, "--temperature-start"), _opt(a, "--temperature-end"),
                _opt(a, "--temperature-anneal-fraction")) == ("cosine", "30", "1", "0.1")
        assert "--max-train-samples" not in a  # full 60k training set
        assert r.subdir == "study2/e6-w0.25" and r.name == f"fm2-{r.arm}-s{r.seed}"
        if r.arm != "static":
            assert "pad_config.init=fresh" in a and "pad_config.router_init=official" in a
        if r.arm in ("imp-init", "imp-warmup", "random-uniform", "repartition", "gates"):
            assert float(_opt(a, "--ratio" if r.arm != "gates" else "--target-ratio")) == 0.3
    warm = next(r for r in vision if r.arm == "imp-warmup")
    assert _opt(warm.args, "--partition-at-step") == str(round(0.1 * (60000 // 64) * 6)) == "562"
    uni = next(r for r in vision if r.arm == "random-uniform")
    assert (_opt(uni.args, "--criterion"), _opt(uni.args, "--partition-scope")) == ("random", "layer")
    rep = next(r for r in vision if r.arm == "repartition")
    assert (_opt(rep.args, "--repartition"), _opt(rep.args, "--growth")) == ("magnitude", "gradient")
    gates = next(r for r in vision if r.arm == "gates")
    assert (_opt(gates.args, "--partition"), _opt(gates.args, "--gate-estimator")) == ("gates", "hard_concrete")
    assert {r.seed for r in text} == {0, 1, 2} and {r.arm for r in text} == {"static", "moe", "pad-imp", "pad-gates"}
    pad_imp = next(r for r in text if r.arm == "pad-imp")
    assert _opt(pad_imp.args, "--ratio") == "0.5" and _opt(pad_imp.args, "--partition-at-step") == "53"
    assert _opt(pad_imp.args, "--epochs") == "2" and "--max-train-samples" not in pad_imp.args
    # a budget-checked setting gets its own results directory and scaled warm-up
    small = study.second_grid(study.Settings(epochs=4, width=0.125), seeds=(1,), text_seeds=())
    assert {r.subdir for r in small} == {"study2/e4-w0.125"} and {r.seed for r in small} == {1}
    assert _opt(next(r for r in small if r.arm == "imp-warmup").args, "--partition-at-step") == "375"


def test_blocked_arms_and_matched_dependency(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")  # never the real runs/study of a working copy
    monkeypatch.setattr(study, "supported_flags", lambda: frozenset({"--partition-at-step", "--partition-preserve"}))
    runs = {r.arm: r for r in study.second_grid(seeds=(0,), text_seeds=())}
    assert "--repartition" in study.blocked_reason(runs["repartition"])
    assert "--harden-at" in study.blocked_reason(runs["gates"])
    assert study.blocked_reason(runs["imp-warmup"]) is None and study.blocked_reason(runs["static"]) is None
    assert "fm2-imp-init-s0" in study.blocked_reason(runs["random-matched"])
    assert study.execute(runs["gates"], 1).startswith("BLOCKED")
    assert study.execute(runs["random-matched"], 1).startswith("BLOCKED")
    runs["imp-init"].result_path.parent.mkdir(parents=True)
    runs["imp-init"].result_path.write_text(json.dumps(_partition_record({"a": (3, 10), "b": (4, 20)})))
    assert study.blocked_reason(runs["random-matched"]) is None


def _partition_record(layers: dict[str, tuple[int, int]], acc: float = 0.9) -> dict:
    rows = [{"name": n, "dynamic_entries": d, "entries": e} for n, (d, e) in layers.items()]
    return {"name": "x", "seed": 0, "summary": {"test_accuracy": acc, "partition": {"layers": rows}}}


def test_matched_command_carries_exact_ratio_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    run = next(r for r in study.second_grid(seeds=(2,), text_seeds=()) if r.arm == "random-matched")
    run.match_path.parent.mkdir(parents=True)
    run.match_path.write_text(json.dumps(_partition_record({"a": (3, 10), "b": (4, 20)})))
    cmd = study.command(run, threads=1)
    assert cmd[1].endswith("experiments/matched_random.py") and _opt(cmd, "--match") == str(run.match_path)
    assert float(_opt(cmd, "--ratio")) == 7 / 30 and _opt(cmd, "--seed") == "2"
    assert _opt(cmd, "--criterion") == "matched_random" and _opt(cmd, "--partition-iterations") == "1"
    (run.run_dir).mkdir(parents=True)
    (run.run_dir / "checkpoint.pt").write_bytes(b"x")
    assert study.command(run, 1)[-1] == "--resume"
    assert study.reproduce_command(run).startswith("python experiments/matched_random.py --match experiments/")


def test_run_batch_waits_for_the_matched_run():
    runs = study.second_grid(seeds=(0,), text_seeds=())
    events = []

    def fake(run, threads):
        events.append(("start", run.arm))
        if run.arm == "imp-init":
            import time

            time.sleep(0.05)  # the matched run must still wait for it
        events.append(("end", run.arm))
        return f"done {run.name}"

    messages = study.run_batch(runs, jobs=3, threads=1, execute_fn=fake, log=lambda *a, **k: None)
    assert len(messages) == 8
    assert events.index(("start", "random-matched")) > events.index(("end", "imp-init"))


def test_main_runs_one_seed_at_a_time_and_stops_on_a_failed_budget(monkeypatch):
    order = []
    monkeypatch.setattr(study, "execute", lambda run, threads: order.append(run.name) or f"done {run.name}")
    monkeypatch.setattr(study, "budget_check", lambda settings: (True, ["budget ok"]))
    assert study.main(["--seeds", "0", "1", "--group", "vision2", "--jobs", "2"]) == 0
    assert [n.rsplit("-s", 1)[1] for n in order] == ["0"] * 8 + ["1"] * 8
    order.clear()
    monkeypatch.setattr(study, "budget_check", lambda settings: (False, ["budget FAIL"]))
    assert study.main(["--seeds", "0", "1", "--group", "vision2"]) == 2
    assert all(n.endswith("-s0") for n in order) and len(order) == 8
    order.clear()
    assert study.main(["--seeds", "0", "1", "--group", "vision2", "--ignore-budget"]) == 0 and len(order) == 16
    order.clear()  # later seeds alone: seed 0's check is read first, and a failure starts nothing
    monkeypatch.setattr(study, "budget_check", lambda settings: (False, ["budget FAIL"]))
    assert study.main(["--seeds", "1", "2"]) == 2 and order == []
    assert study.main(["--seeds", "1", "--ignore-budget"]) == 0 and len(order) == 8
    order.clear()  # default group: vision only; text runs only when asked for, after the vision seeds
    monkeypatch.setattr(study, "budget_check", lambda settings: (True, ["budget ok"]))
    assert study.main(["--seeds", "0"]) == 0 and all(n.startswith("fm2-") for n in order) and len(order) == 8
    order.clear()
    assert study.main(["--seeds", "0", "1", "--group", "vision2", "--group", "text2"]) == 0
    assert [n.split("-")[0] + n.rsplit("-s", 1)[1] for n in order] == (["fm20"] * 8 + ["fm21"] * 8 + ["text20"] * 4
                                                                         + ["text21"] * 4)


def test_budget_check_reads_seed0(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    s = study.Settings()
    runs = {r.arm: r for r in study.second_grid(s, seeds=(0,), text_seeds=())}
    ok, lines = study.budget_check(s, per_step={"static": 0.1, "imp-init": 0.3})
    assert not ok and "no result" in lines[-1]
    for arm, acc, secs in (("static", 0.915, 0.1 * s.total_steps), ("imp-init", 0.92, 0.3 * s.total_steps * 1.5)):
        runs[arm].result_path.parent.mkdir(parents=True, exist_ok=True)
        runs[arm].result_path.write_text(json.dumps({"summary": {"test_accuracy": acc, "train_seconds": secs}}))
    ok, lines = study.budget_check(s, per_step={"static": 0.1, "imp-init": 0.3})
    text = "\n".join(lines)
    assert not ok and "91.50 %" in text and "1.36x" in text and "FAIL" in text  # 1.5 / 1.1 eval overhead
    ok, _ = study.budget_check(s, per_step={"static": 0.1, "imp-init": 0.4})
    assert ok


# ---------------------------------------------------------------------------------------- matched random
def test_matched_random_partition_hits_per_layer_counts():
    import torch
    from torch import nn

    import padnet
    from padnet.layers.modes import pad_layers
    from padnet.transforms.partition import PartitionConfig, partition_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                          nn.Conv2d(6, 4, 1))  # two PAD layers, each with a weight and a bias group
    padnet.dynamize_(model, padnet.PadConfig())
    layers = dict(pad_layers(model))
    sizes = {n: sum(g.mask.numel() for g in layer.mode_groups()) for n, layer in layers.items()}
    assert len(sizes) >= 2
    names = list(sizes)  # skewed: ~70 %, 1 entry, then fully dynamic layers
    targets = {n: (int(0.7 * sizes[n]) if i == 0 else 1 if i == 1 else sizes[n]) for i, n in enumerate(names)}
    record = {"summary": {"partition": {"layers": [
        {"name": n, "dynamic_entries": targets[n], "entries": sizes[n]} for n in sizes]}}}
    assert matched.matched_targets(record) == targets
    ratio = matched.matched_ratio(record)
    assert ratio == sum(targets.values()) / sum(sizes.values())
    scores = matched.matched_scores(model, targets, seed=3)
    again = matched.matched_scores(model, targets, seed=3)
    assert all(torch.equal(scores[k], again[k]) for k in scores)  # deterministic per seed
    matched.register()
    cfg = PartitionConfig(ratio=ratio, criterion="matched_random", iterations=1, scope="global")
    with matched.prepared_scores(model, targets, seed=3):
        report = partition_(model, None, None, cfg).to_dict()
    matched.check_counts(report, targets)
    for name, layer in layers.items():
        dyn = sum(int(g.mask.sum()) for g in layer.mode_groups())
        assert dyn == targets[name]
        chosen = torch.cat([(scores[(name, g.name)] >= 1).flatten() for g in layer.mode_groups()])
        masks = torch.cat([g.mask.bool().flatten() for g in layer.mode_groups()])
        assert torch.equal(chosen, masks)  # exactly the prepared random entries
    with pytest.raises(RuntimeError, match="per-layer targets"):
        matched.check_counts(report, {**targets, names[0]: targets[names[0]] - 1})
    with pytest.raises(RuntimeError, match="only usable through"):  # no scores prepared outside the block
        partition_(model, None, None, cfg)


def test_matched_random_bad_input():
    with pytest.raises(ValueError, match="no partition report"):
        matched.matched_targets({"summary": {"test_accuracy": 0.9}})
    with pytest.raises(ValueError, match="layer 'a'"):
        matched.matched_targets(_partition_record({"a": (11, 10)}))


# -------------------------------------------------------------------------------------------- statistics
T975_DF2 = 4.302652729749464  # Student t 97.5 % quantile, 2 degrees of freedom


def test_paired_test_ci_and_one_sided_p_by_hand():
    diffs = [1.0, 1.5, 3.0]
    mean, sd = 11 / 6, math.sqrt(((1 - 11 / 6) ** 2 + (1.5 - 11 / 6) ** 2 + (3 - 11 / 6) ** 2) / 2)
    se = sd / math.sqrt(3)

    def sf_df2(t):  # P(T > t), 2 degrees of freedom, closed form
        return 0.5 * (1 - t / math.sqrt(2 + t * t))

    sup = report.paired_test(diffs, "superiority")
    assert sup["mean"] == pytest.approx(mean) and sup["sd"] == pytest.approx(sd)
    assert sup["ci"] == pytest.approx((mean - T975_DF2 * se, mean + T975_DF2 * se))
    assert sup["p"] == pytest.approx(sf_df2(mean / se))
    ni = report.paired_test([-0.1, 0.05, -0.25], "noninferiority", margin=0.2)
    m, s = -0.1, math.sqrt((0 + 0.15 ** 2 + 0.15 ** 2) / 2)
    assert ni["p"] == pytest.approx(sf_df2((m + 0.2) / (s / math.sqrt(3))))
    two = report.paired_test(diffs, "two-sided")
    assert two["p"] == pytest.approx(2 * sf_df2(mean / se))
    assert report.paired_test([0.5], "superiority")["p"] is None  # one seed: no test
    assert report.paired_test([0.5, 0.5], "superiority")["p"] is None  # no spread
    with pytest.raises(ValueError, match="unknown test kind"):
        report.paired_test(diffs, "bigger")


def test_holm_by_hand():
    adj = report.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})  # 3 x 0.01; 2 x 0.03; max(0.06, 0.04)
    adj = report.holm({"a": 0.02, "b": None, "c": 0.6})
    assert adj["b"] is None and adj["a"] == pytest.approx(0.04) and adj["c"] == pytest.approx(0.6)
    assert report.holm({"a": 0.5, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})


def _write_result(root: Path, setting: str, arm: str, seed: int, acc: float, metrics=None) -> None:
    prefix = "text2" if setting == "text" else "fm2"
    d = root / setting
    d.mkdir(parents=True, exist_ok=True)
    rec = {"name": f"{prefix}-{arm}-s{seed}", "arm": arm, "seed": seed, "setting": setting,
           "summary": {"test_accuracy": acc / 100, "train_seconds": 100.0,
                       "params": {"total": 1_000_000, "dynamic": 300_000}},
           "metrics": metrics or [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2)]}
    (d / f"{rec['name']}.json").write_text(json.dumps(rec))


def test_report_study2_from_synthetic_results(tmp_path):
    root = tmp_path / "study2"
    pad = {0: 92.0, 1: 92.4, 2: 91.8}
    for s, v in pad.items():
        curves = [{"epoch": e, "train_loss": 0.5 / e, "routing_entropy": 0.9 - 0.1 * e, "kernel_spread": 0.5}
                  for e in (1, 2)]
        _write_result(root, "e6-w0.25", "imp-init", s, v, curves)
        _write_result(root, "e6-w0.25", "dynamic", s, v - 0.1 * (s + 1))   # diffs 0.1, 0.2, 0.3
        _write_result(root, "e6-w0.25", "static", s, v + 1.0 + 0.5 * s)   # PAD clearly worse
    _write_result(root, "e6-w0.25", "random-matched", 0, 91.0)          # one seed only
    results = report.load_study2(root)
    assert set(results["e6-w0.25"]) == {"imp-init", "dynamic", "static", "random-matched"}
    rows = {r["key"]: r for r in report.primary_rows(results["e6-w0.25"])}
    assert rows["a"]["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    a = report.paired_test([0.1, 0.2, 0.3], "noninferiority", 0.2)
    b = report.paired_test([-1.0, -1.5, -2.0], "noninferiority", 0.2)
    assert rows["a"]["p"] == pytest.approx(a["p"]) and rows["b"]["p"] == pytest.approx(b["p"])
    assert rows["a"]["p_holm"] == pytest.approx(min(1, 2 * a["p"]))  # (c) untestable: family of 2
    assert rows["a"]["verdict"] == "shown" and rows["b"]["verdict"] == "not shown"
    assert rows["c"]["verdict"].startswith("not testable yet (1 paired")
    md = report.study2_markdown(results, figures=tmp_path / "figs")
    assert "setting `e6-w0.25` (10 of 40 runs finished)" in md
    assert "| PAD kappa=0.3, learned gates (hard concrete) | not run | not run |" in md
    assert "| fully dynamic (K=4) | 91.90 | 92.20 | 91.50 | not run | not run |" in md
    assert "Not yet run: no result files in `experiments/results/study2/text/`." in md
    assert (tmp_path / "figs" / "study2_curves_e6-w0.25.png").is_file()
    assert "(no run logged routing_std: left out of the figure)" in md
    empty = report.study2_markdown({}, figures=tmp_path / "figs2")
    assert "setting `e6-w0.25` (0 of 40 runs finished)" in empty and "Not yet run" in empty
    assert "not yet run" in empty and "Curves: no finished runs yet." in empty
    assert not any(ch.isdigit() and ch != "0" for ch in empty.split("| seed 4 |")[-1].split("Primary")[0]
                   .replace("0.3", "").replace("K=4", "").replace("10 %", ""))


def test_report_main_rewrites_both_blocks(tmp_path, monkeypatch):
    doc = tmp_path / "results.md"
    doc.write_text(f"# R\n\nkept\n{report.BEGIN}\nold\n{report.END}\nmiddle\n{report.BEGIN2}\nold2\n{report.END2}\nend\n")
    monkeypatch.setattr(report, "DOC", doc)
    monkeypatch.setattr(report, "STUDY2", tmp_path / "none")
    monkeypatch.setattr(report, "FIGURES", tmp_path / "figs")
    monkeypatch.setattr(report, "generated_markdown", lambda runs, speed: "first\n")
    assert report.main() == 0
    text = doc.read_text()
    assert "old" not in text and "kept" in text and "middle" in text and text.endswith("end\n")
    assert f"{report.BEGIN}\nfirst\n{report.END}" in text and "Not yet run" in text
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        report.main()


def test_matched_random_main_refuses_a_ratio_other_than_the_matched_runs(tmp_path, capsys):
    path = tmp_path / "imp.json"
    path.write_text(json.dumps(_partition_record({"layer1.0.conv1": (3, 10)})))
    args = ["--match", str(path), "--variant", "pad", "--criterion", "matched_random", "--partition-iterations", "1",
            "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        matched.main([*args, "--ratio", "0.5"])
    assert "matched run's achieved kappa 0.3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_sign_flip_p_by_hand():
    # all 5 positive: only the identity pattern reaches the observed sum -> 1/32
    assert report.sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(1 / 32)
    # [1, -2]: sums of the 4 patterns are -1, 3, -3, 1 (observed -1): three are >= -1
    assert report.sign_flip_p([1.0, -2.0]) == pytest.approx(3 / 4)
    # the margin shifts the differences: [-0.1, -0.1] + 0.2 = [0.1, 0.1] -> only (+, +) reaches 0.2
    assert report.sign_flip_p([-0.1, -0.1], shift=0.2) == pytest.approx(1 / 4)
    assert report.sign_flip_p([0.0, 0.0]) == 1.0  # ties count as extreme
    assert report.sign_flip_p([]) is None
    with pytest.raises(ValueError, match="exceed"):
        report.sign_flip_p([0.1] * 21)
    rows = report.primary_rows({"imp-init": {s: {"summary": {"test_accuracy": 0.9 + s / 1000}} for s in range(3)},
                                "dynamic": {s: {"summary": {"test_accuracy": 0.9}} for s in range(3)}})
    assert rows[0]["p_sign_flip"] == pytest.approx(1 / 8)  # diffs 0, 0.1, 0.2 + 0.2 margin: all positive
    assert rows[2]["p_sign_flip"] is None


def test_routing_end_rows_by_hand():
    def rec(entropy, std, spread, layer_stds):
        return {"metrics": [{"epoch": 1}, {"epoch": 2, "routing_entropy": entropy, "routing_std": std,
                                            "kernel_spread": spread,
                                            "routing": {f"l{i}": {"pi_std": v} for i, v in enumerate(layer_stds)}}]}
    runs = {"dynamic": {0: rec(0.99, 0.02, 0.5, [0.01, 0.03]), 1: rec(0.97, 0.04, 0.3, [0.05, 0.02])},
            "static": {0: {"metrics": [{"epoch": 1, "train_loss": 0.3}]}}}
    arms = {"static": ("static",), "dynamic": ("fully dynamic",)}
    rows = report.routing_end_rows(runs, arms)
    body = [r for r in rows if r.startswith("| fully dynamic")]
    assert body == ["| fully dynamic | 2 | 0.980 | 0.030 | 0.040 | 0.400 |"]  # max per seed 0.03, 0.05 -> 0.04
    assert not any(r.startswith("| static") for r in rows)  # no routing logged: left out
    assert report.routing_end_rows({"static": runs["static"]}, arms) == []


def test_simultaneous_interval_is_bonferroni_over_the_tested_questions():
    runs = {"imp-init": {s: {"summary": {"test_accuracy": v}} for s, v in enumerate([0.921, 0.924, 0.926])},
            "dynamic": {s: {"summary": {"test_accuracy": 0.922}} for s in range(3)},
            "static": {s: {"summary": {"test_accuracy": v}} for s, v in enumerate([0.925, 0.921, 0.924])}}
    rows = {r["key"]: r for r in report.primary_rows(runs)}
    assert rows["c"]["ci_simultaneous"] is None  # no random-matched runs: not in the family (m = 2)
    diffs = rows["a"]["diffs"]
    lo, hi = rows["a"]["ci_simultaneous"]
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    from scipy import stats
    t = stats.t.ppf(1 - 0.05 / 2 / 2, 2)  # two-sided 1 - 0.05 / m, m = 2
    assert (lo, hi) == pytest.approx((mean - t * se, mean + t * se))
    assert lo < rows["a"]["ci"][0] and hi > rows["a"]["ci"][1]  # wider than the per-question interval


def test_code_version_in_a_repo_and_without_one(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find an enclosing repo
    assert study.code_version(tmp_path)["commit"] is None  # not a repository
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "c"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    v = study.code_version(tmp_path)
    assert v["commit"] == head and v["dirty"] is False and len(v["started"]) == 19
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert study.code_version(tmp_path)["dirty"] is True
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    # tracked files outside src/ and experiments/, and committed results changing while a grid runs: not code
    (tmp_path / "README").write_text("r\n")
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "r.json").write_text("{}\n")
    (tmp_path / "experiments" / "study.py").write_text("s = 1\n")
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "d"], cwd=tmp_path, check=True)
    (tmp_path / "README").write_text("changed\n")
    (tmp_path / "experiments" / "results" / "r.json").write_text('{"a": 1}\n')
    assert study.code_version(tmp_path)["dirty"] is False
    (tmp_path / "experiments" / "study.py").write_text("s = 2\n")
    assert study.code_version(tmp_path)["dirty"] is True


def test_execute_records_the_code_of_each_start(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(study, "code_version", lambda: {"commit": "abc", "dirty": False, "started": "t"})
    run = study.grid()[1]

    def fake_train(cmd, **kwargs):  # what padnet train leaves behind
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))
        (run.run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
        return 0

    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: 1)  # a first start that stops (killed)
    assert study.execute(run, 1).startswith("FAILED")
    monkeypatch.setattr(study, "code_version", lambda: {"commit": "def", "dirty": True, "started": "u"})
    monkeypatch.setattr(study.subprocess, "call", fake_train)  # resumed on other code
    assert study.execute(run, 1).startswith("done")
    record = json.loads(run.result_path.read_text())
    assert record["code"] == [{"commit": "abc", "dirty": False, "started": "t"},
                              {"commit": "def", "dirty": True, "started": "u"}]


def test_allocation_rows_by_hand():
    runs = {"imp-init": {0: {"summary": {"layer_dynamic_ratios": {"a": 0.8, "b": 0.2}}},
                         1: {"summary": {"layer_dynamic_ratios": {"a": 0.6, "b": 0.3}}}},
            "static": {0: {"summary": {"test_accuracy": 0.9}}}}
    arms = {"static": ("static",), "imp-init": ("PAD, IMP at init",)}
    rows = report.allocation_rows(runs, arms)
    assert "| arm | seeds | `a` | `b` |" in rows
    assert "| PAD, IMP at init | 2 | 70 | 25 |" in rows
    assert not any(r.startswith("| static") for r in rows)
    assert report.allocation_rows({"static": runs["static"]}, arms) == []


def test_report_tables_tolerate_missing_layer_fields():
    last = {"epoch": 1, "routing_entropy": 0.9, "routing_std": 0.1, "kernel_spread": 0.2,
            "routing": {"a": {"pi_std": None}, "b": {}}}
    rows = report.routing_end_rows({"dynamic": {0: {"metrics": [last]}}}, {"dynamic": ("dyn",)})
    assert "| dyn | 1 | 0.900 | 0.100 | – | 0.200 |" in rows  # no layer with pi_std: no largest-layer figure
    runs = {"imp-init": {0: {"summary": {"layer_dynamic_ratios": {"a": 0.5}}},
                         1: {"summary": {"layer_dynamic_ratios": {"a": 0.7, "b": 0.1}}}}}
    rows = report.allocation_rows(runs, {"imp-init": ("imp",)})
    assert "| arm | seeds | `a` | `b` |" in rows and "| imp | 2 | 60 | 10 |" in rows  # union of layers


def test_summary_lines_by_hand():
    def rec(a, train=None, entropy=None):
        r = {"summary": {"test_accuracy": a / 100}, "metrics": [{"epoch": 1}]}
        if train is not None:
            r["summary"]["train_accuracy"] = train / 100
        if entropy is not None:
            r["metrics"][-1].update(routing_entropy=entropy, routing_std=0.02)
        return r

    arms = {"static": ("static",), "dynamic": ("fully dynamic",), "imp-init": ("PAD",)}
    runs = {"static": {0: rec(92.0, 92.5), 1: rec(92.2, 92.7)},
            "dynamic": {0: rec(92.1, 92.6, 0.99), 1: rec(92.5, 92.8, 0.98)},
            "imp-init": {0: rec(92.3, entropy=0.97)}}
    lines = report.summary_lines(runs, arms, (0, 1))
    assert lines[0] == "- Runs: 5 of 6; seeds with all 3 arms: 0."
    assert lines[1] == ("- Mean test accuracy over those seeds: 92.00 % (static) to 92.30 % (PAD), "
                        "a spread of 0.30 points.")
    a = next(x for x in lines if x.startswith("- (a)"))
    assert a.startswith("- (a) PAD (IMP at init) >= fully dynamic (non-inferiority, margin 0.2): **not testable yet")
    assert "over 1 paired seeds: mean +0.20" in a and "1 of 1 seeds positive" in a
    assert any(x.startswith("- (c)") and x.endswith("not yet run.") for x in lines)
    d = next(x for x in lines if x.startswith("- Fully dynamic - static"))
    assert d.startswith("- Fully dynamic - static: +0.20 points") and "(2 seeds" in d
    assert "- Routing at the end of training, every dynamic run (3): normalised entropy 0.970-0.990, " \
           "pi std (mean over layers) 0.020-0.020." in lines
    assert "- Training accuracy (last epoch, mean): static 92.60 %, fully dynamic 92.70 %." in lines
