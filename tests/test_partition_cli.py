"""``padnet partition`` CLI verb."""

import argparse
import json

import pytest
import torch

import padnet
from padnet.commands import partition as partition_cmd
from padnet.layers import pad_layers
from padnet.models import create_model
from padnet.partition.units import round_half_up

ZOO = ["--model", "resnet10", "--small-input", "--width", "0.25", "--num-classes", "5"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="padnet")
    sub = parser.add_subparsers(dest="command")
    partition_cmd.register(sub)
    return parser.parse_args(["partition", *argv])


def run(argv):
    args = parse(argv)
    return args.func(args)


def kappa_of(model):
    groups = [g for _, layer in pad_layers(model) for g in layer.mode_groups()]
    return sum(int(g.mask.sum()) for g in groups), sum(g.mask.numel() for g in groups)


def test_zoo_dry_run_saves_model_and_report(tmp_path, capsys):
    out, rep = tmp_path / "pad.safetensors", tmp_path / "report.json"
    code = run([*ZOO, "--ratio", "0.25", "--iterations", "2", "--dry-run", "--image-size", "8", "--batches", "1",
                "--batch-size", "2", "--output", str(out), "--report-json", str(rep)])
    assert code == 0
    text = capsys.readouterr().out
    assert "TOTAL" in text and "criterion=taylor" in text and "saved to" in text
    report = json.loads(rep.read_text())
    assert report["iterations"] == 2 and report["num_batches"] == 1 and report["target_ratio"] == 0.25
    model = padnet.load(out)
    live, total = kappa_of(model)
    assert live == round_half_up(0.25 * total) == report["dynamic_entries"]
    step = padnet.get_state(model).last("partition")  # the kappa it was partitioned at survives save/load
    assert step.params["ratio"] == 0.25 and step.params["criterion"] == "taylor"
    assert padnet.io.read_metadata(out)["extra"]["partition"]["criterion"] == "taylor"


def test_model_path_data_free(tmp_path, capsys):
    model = create_model("resnet10", small_input=True, width=0.25, num_classes=5)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    padnet.partition_(model, None, None, ratio=0.4, criterion="magnitude", iterations=1)
    path = tmp_path / "dyn.safetensors"
    padnet.save(model, path)
    out = tmp_path / "pad.safetensors"
    # ratio defaults to the kappa the file was last partitioned at (0.4); magnitude needs no data
    assert run([str(path), "--criterion", "magnitude", "--granularity", "kernel", "--iterations", "1",
                "--output", str(out)]) == 0
    assert "data-free criterion" in capsys.readouterr().out
    live, total = kappa_of(padnet.load(out))
    assert abs(live - round_half_up(0.4 * total)) <= 9


def test_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data"):
        run([*ZOO, "--criterion", "taylor"])
    with pytest.raises(ValueError, match="registered criteria"):
        run([*ZOO, "--criterion", "bogus", "--dry-run"])
    with pytest.raises(ValueError, match="registered schedules"):
        run([*ZOO, "--schedule", "bogus", "--dry-run"])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        run([*ZOO, "--ratio", "1.5", "--dry-run"])
    with pytest.raises(ValueError, match="iterations"):
        run([*ZOO, "--iterations", "0", "--dry-run"])
    with pytest.raises(ValueError, match="MODEL_PATH"):
        run(["--dry-run"])
    with pytest.raises(ValueError, match="not both"):
        run([str(tmp_path / "x.safetensors"), *ZOO])
    with pytest.raises(ValueError, match="no such padnet file"):
        run([str(tmp_path / "missing.safetensors"), "--criterion", "magnitude"])
    with pytest.raises(SystemExit):
        parse([*ZOO, "--scope", "bogus"])


def test_random_batches_shapes():
    model = create_model("resnet10", small_input=True, width=0.25, num_classes=3)
    batches = partition_cmd.random_batches(model, 3, 8, num_batches=2, batch_size=4, seed=1)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and y.shape == (4,) and int(y.max()) < 3
    assert torch.equal(batches[0][0], partition_cmd.random_batches(model, 3, 8, 2, 4, seed=1)[0][0])


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) not installed",
)
def test_recipe_data_source(tmp_path, capsys):
    rep = tmp_path / "report.json"
    code = run(["--model", "resnet10", "--small-input", "--width", "0.125", "--num-classes", "10", "--in-chans", "1",
                "--ratio", "0.3", "--iterations", "1", "--recipe", "fashion-mnist", "--batches", "2",
                "--batch-size", "4", "--report-json", str(rep)])
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["num_batches"] == 2 and report["target_ratio"] == 0.3
    assert "criterion=taylor" in capsys.readouterr().out
