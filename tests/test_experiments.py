"""The reproduction-study tooling: the run grid, result collection and the paired statistics."""

from __future__ import annotations

import importlib.util
import json
import math
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
