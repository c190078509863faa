"""End-to-end `padnet train` runs on Fashion-MNIST: PAD accuracy, kill + resume, two processes, the demo.

Kept small for a shared 2-core machine (one intra-op thread per process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from padnet.cli import main
from padnet.data import DEFAULT_FASHION_MNIST_ROOT

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    not any((DEFAULT_FASHION_MNIST_ROOT / f).exists()
            for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pad_fashion_mnist_one_epoch_2000_samples(tmp_path):
    """The issue's command: default model (ResNet-10 width 0.5), PAD kappa=0.3, IMP at init, 1 epoch."""
    out = tmp_path / "D"
    rc = main(["train", "--recipe", "fashion-mnist", "--variant", "pad", "--ratio", "0.3", "--epochs", "1",
               "--max-train-samples", "2000", "--max-test-samples", "1000", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    s = _summary(out)
    assert s["test_accuracy"] >= 0.6, s["test_accuracy"]
    p = s["params"]
    assert p["total"] > p["dynamic"] > 0
    assert s["partition"]["criterion"] == "taylor" and s["partition"]["iterations"] == 5
    assert s["partition"]["ratio"] == pytest.approx(0.3, abs=1e-3)
    assert s["params_static"]["total"] < p["total"] < s["params_fully_dynamic"]["total"]
    assert s["model"] == "resnet10" and s["width"] == 0.5 and s["flops"] > 0


RESUME_ARGS = ["train", "--variant", "pad", "--ratio", "0.5", "--criterion", "magnitude", "--partition-iterations",
               "2", "--width", "0.125", "--max-train-samples", "512", "--max-test-samples", "128", "--batch-size",
               "64", "--epochs", "2", "--temperature-epochs", "1", "--seed", "3", "--quiet"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main([*RESUME_ARGS, "--output-dir", str(full)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "padnet", *RESUME_ARGS, "--output-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-epoch 2: no chance to clean up
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert [m["epoch"] for m in _metrics(killed)] == [1]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 1

    assert main(["train", "--resume", "--output-dir", str(killed), "--quiet"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_metrics(killed)) == strip(_metrics(full))
    a, b = _summary(full), _summary(killed)
    for key in ("test_accuracy", "best_test_accuracy", "params", "partition_step", "layer_dynamic_ratios"):
        assert a[key] == b[key], key
    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert "resumed from" in (killed / "train.log").read_text()


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    rc = main(["train", "--nproc", "2", "--variant", "pad", "--ratio", "0.3", "--criterion", "taylor",
               "--partition-iterations", "2", "--partition-batches", "1", "--width", "0.125", "--max-train-samples",
               "256", "--max-test-samples", "101", "--batch-size", "32", "--epochs", "1", "--quiet",
               "--output-dir", str(out)])
    assert rc == 0
    s = _summary(out)
    assert s["world_size"] == 2 and s["partition"]["world_size"] == 2
    assert s["partition_masks_identical"] is True
    assert s["num_test_samples"] == 101 and 0.0 <= s["test_accuracy"] <= 1.0
    assert s["partition"]["ratio"] == pytest.approx(0.3, abs=1e-3)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        s["files"]), "only rank 0 writes, and exactly the listed files"


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "1", "--max-train-samples", "256", "--max-test-samples", "128", "--width",
               "0.125", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "compact outputs match" in text and "fully dynamic (kappa=1)" in text
    check = json.loads((out / "compact_check.json").read_text())
    assert check["outputs_match"] and check["max_abs_diff"] < 1e-4
    assert (out / "compact.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
