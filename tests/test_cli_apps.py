"""The CLI end to end as a new user runs it (issue 14 items 4-8).

count / partition on text models, export of text models and at the run's own
input size, relative --data-dir, class names saved with the model and run,
``padnet predict``, ``padnet export --format safetensors --compact``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import padnet
from padnet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")


def _quiet(capsys) -> tuple[str, str]:
    out = capsys.readouterr()
    return out.out, out.err


# ----------------------------------------------------------- item 4: text models


@pytest.mark.parametrize("model", ["tiny_bert", "minilm"])
def test_count_text_models(model, capsys):
    assert main(["count", "--model", model, "--variant", "pad", "--ratio", "0.3", "--seq-len", "8"]) == 0
    out, _ = _quiet(capsys)
    assert "MoEFeedForward" in out and "TOTAL" in out and "FLOPs per sequence of 8 tokens" in out


def test_count_text_model_num_classes_and_wrong_size_flag(capsys):
    assert main(["count", "--model", "tiny_bert", "--variant", "static", "--num-classes", "5"]) == 0
    assert main(["count", "--model", "tiny_bert", "--variant", "static", "--image-size", "32"]) == 2
    assert "--image-size does not fit text model 'tiny_bert'; use --seq-len" in _quiet(capsys)[1]
    assert main(["count", "--model", "bert", "--variant", "static"]) == 2
    assert "--model bert needs --model-path DIR" in _quiet(capsys)[1]


def test_partition_text_model(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["partition", "--model", "tiny_bert", "--dry-run", "--ratio", "0.3", "--iterations", "1",
                 "--output", str(out)]) == 0
    import re

    assert re.search(r"achieved=0\.(29|30)", _quiet(capsys)[0])
    model = padnet.load(out)
    assert model.classifier.out_features == 2


# ------------------------------------------------------- item 5/6: export inputs


@pytest.fixture
def text_model_file(tmp_path):
    from padnet.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_bert", num_labels=3)
    padnet.dynamize_(model, padnet.PadConfig(target_types=["ffn"], num_experts=2, top_k=1, seed=0))
    return padnet.save(model, tmp_path / "text.safetensors")


@pytest.mark.parametrize("flags,length", [(["--seq-len", "12"], 12), (["--input-shape", "10"], 10), ([], 16)])
def test_export_text_model(text_model_file, tmp_path, capsys, flags, length):
    pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "t.onnx"
    assert main(["export", str(text_model_file), "-o", str(out), "--exporter", "torchscript", *flags]) == 0
    text, _ = _quiet(capsys)
    assert f"example input [batch, {length}]" in text and "verify batch 3" in text
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [length]


def test_export_text_model_bad_shape(text_model_file, tmp_path, capsys):
    assert main(["export", str(text_model_file), "-o", str(tmp_path / "t.pt2"), "--input-shape", "1,28,28"]) == 2
    assert "sequence length T" in _quiet(capsys)[1]
    assert main(["export", str(text_model_file), "-o", str(tmp_path / "t.pt2"), "--seq-len", "100000"]) == 2
    assert "max_position_embeddings" in _quiet(capsys)[1]


def test_export_uses_the_saved_input_record(tmp_path, capsys):
    """A model trained at 28 px exports at 28 px (it used to export at 32 and reject real images)."""
    pytest.importorskip("onnxruntime")
    from padnet.io.exporters import run_onnx
    from padnet.models import create_model

    model = create_model("resnet10", num_classes=10, in_chans=1, small_input=True, width=0.125)
    path = padnet.save(model, tmp_path / "m.safetensors",
                       extra={"input": {"kind": "image", "shape": [1, 28, 28], "dtype": "torch.float32"}})
    out = tmp_path / "m.onnx"
    assert main(["export", str(path), "-o", str(out), "--exporter", "torchscript"]) == 0
    assert "example input [batch, 1x28x28]" in _quiet(capsys)[0]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(run_onnx(out, x)[0]), model.eval()(x), rtol=1e-4, atol=1e-5)
    # an explicit shape overrides the record; a channel mismatch is refused
    assert main(["export", str(path), "-o", str(out), "--exporter", "torchscript", "--input-shape", "1,20,20"]) == 0
    assert "example input [batch, 1x20x20]" in _quiet(capsys)[0]
    assert main(["export", str(path), "-o", str(out), "--input-shape", "3,28,28"]) == 2
    assert "has 3 channel(s) but the model takes 1" in _quiet(capsys)[1]
    assert main(["export", str(path), "-o", str(out), "--input-shape", "a,b"]) == 2
    assert "comma-separated integers" in _quiet(capsys)[1]


def test_export_compact_safetensors(tmp_path, capsys):
    from padnet.layers.modes import is_compact_layer
    from padnet.models import create_model

    model = create_model("resnet10", num_classes=4, in_chans=1, small_input=True, width=0.125)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    padnet.partition_(model, None, None, ratio=0.3, criterion="magnitude", iterations=1)
    src = padnet.save(model, tmp_path / "pad.safetensors", extra={"classes": ["a", "b", "c", "d"]})
    out = tmp_path / "compact.safetensors"
    assert main(["export", str(src), "--format", "safetensors", "--compact", "-o", str(out)]) == 0
    text, _ = _quiet(capsys)
    assert "verify batch 3: max abs error" in text
    compact = padnet.load(out)
    assert any(is_compact_layer(m) for m in compact.modules())
    assert padnet.io.read_metadata(out)["extra"]["classes"] == ["a", "b", "c", "d"]
    assert out.stat().st_size < src.stat().st_size
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------ items 6, 7, 8: a real tiny run


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    base = tmp_path_factory.mktemp("vision")
    work = base / "work"
    work.mkdir()
    rel = os.path.relpath(FASHION, work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rc = main(["train", "--variant", "pad", "--ratio", "0.5", "--criterion", "magnitude", "--partition-iterations",
                   "1", "--width", "0.125", "--max-train-samples", "64", "--max-test-samples", "32", "--batch-size",
                   "32", "--epochs", "1", "--quiet", "--data-dir", rel, "--output-dir", "run"])
        torch.set_num_threads(threads)
    finally:
        os.chdir(cwd)
    assert rc == 0
    return work / "run"


def test_run_records_classes_input_and_absolute_paths(vision_run):
    from padnet.data import FashionMNIST

    summary = json.loads((vision_run / "summary.json").read_text())
    assert summary["classes"] == FashionMNIST.classes
    assert summary["input"] == {"kind": "image", "shape": [1, 28, 28], "dtype": "torch.float32"}
    assert summary["config"]["data_dir"] == str(FASHION.resolve())
    extra = padnet.io.read_metadata(vision_run / "model.safetensors")["extra"]
    assert extra["classes"] == FashionMNIST.classes
    assert extra["input"]["shape"] == [1, 28, 28]
    assert extra["train_config"]["recipe"] == "fashion-mnist"


def test_evaluate_from_another_directory(vision_run, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "a" / "b" / "c" / "d"  # a relative --data-dir would resolve elsewhere from here
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(vision_run), "--no-write"]) == 0
    assert "test accuracy" in _quiet(capsys)[0]


def test_export_run_directory_at_run_size(vision_run, tmp_path, capsys):
    out = tmp_path / "r.pt2"
    assert main(["export", str(vision_run), "--format", "torch-export", "--compact", "-o", str(out)]) == 0
    assert "example input [batch, 1x28x28]" in _quiet(capsys)[0]


def _images(folder: Path, n: int = 3) -> tuple[list[Path], list[str]]:
    from PIL import Image

    from padnet.data import FashionMNIST

    test = FashionMNIST(FASHION, train=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(test.data[i].numpy()).convert("RGB").save(paths[-1])  # RGB file, 1-channel model
    return paths, [test.classes[int(t)] for t in test.targets[:n]]


def test_predict_images(vision_run, tmp_path, capsys):
    from padnet.commands.predict import predict
    from padnet.data import FashionMNIST

    paths, _ = _images(tmp_path / "imgs")
    assert main(["predict", str(vision_run), *map(str, paths), "--top-k", "2"]) == 0
    lines = _quiet(capsys)[0].strip().splitlines()
    assert len(lines) == 3
    for line, path in zip(lines, paths):
        cells = line.split("\t")
        assert cells[0] == str(path) and cells[1] in FashionMNIST.classes and cells[3] in FashionMNIST.classes
        assert 1.0 >= float(cells[2]) >= float(cells[4]) >= 0.0
    # same numbers as the model applied to the recipe's own preprocessing of the test images
    ids, probs, labels = predict(vision_run / "model.safetensors", [str(tmp_path / "imgs")])
    assert labels == FashionMNIST.classes and probs.shape == (3, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    from padnet.train.recipes import get_recipe
    from padnet.train.config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads((vision_run / "config.json").read_text()))
    x = get_recipe("fashion-mnist").batch_transform(cfg, train=False)(
        FashionMNIST(FASHION, train=False).data[:3])
    with torch.no_grad():
        ref = torch.softmax(padnet.load(vision_run / "model.safetensors").eval()(x), -1)
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-5)
    out = tmp_path / "p.csv"
    assert main(["predict", str(vision_run), str(tmp_path / "imgs"), "-o", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0][:3] == ["input", "label", "probability"] and rows[0][3] == "p_T-shirt/top" and len(rows) == 4


def test_predict_errors(vision_run, tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    assert main(["predict", str(vision_run), str(tmp_path / "rows.csv")]) == 2
    assert "text files given, but this is an image model" in _quiet(capsys)[1]
    assert main(["predict", str(vision_run), str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such file" in _quiet(capsys)[1]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(vision_run), str(tmp_path / "bad.png")]) == 2
    assert "bad.png: cannot read image" in _quiet(capsys)[1]
    assert main(["predict", str(tmp_path), str(tmp_path / "bad.png")]) == 2
    assert "without model.safetensors" in _quiet(capsys)[1]


def test_text_run_predict_csv_rows(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    data = tmp_path / "train.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(48):
            good = i % 2 == 0
            w.writerow([" ".join(rng.choice(["great", "fun", "loved"] if good else ["awful", "dull", "hated"], 3)),
                        "positive" if good else "negative"])
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--recipe", "text-csv", "--model", "tiny_bert", "--variant", "static", "--data-dir",
                 "train.csv", "--set", "text_column=review", "--set", "label_column=sentiment", "--set",
                 "max_length=16", "--epochs", "1", "--batch-size", "8", "--quiet", "--output-dir", "trun"]) == 0
    summary = json.loads((tmp_path / "trun" / "summary.json").read_text())
    assert summary["classes"] == ["negative", "positive"] and summary["input"]["seq_len"] == 16
    (tmp_path / "new.csv").write_text("review,id\ngreat fun,1\nawful dull,2\n")
    assert main(["predict", "trun", "new.csv", "-o", "pred.jsonl"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == ["new.csv:1", "new.csv:2"]
    assert all(r["label"] in ("negative", "positive") and set(r["probabilities"]) == {"negative", "positive"}
               for r in rows)
    assert main(["predict", "trun", "new.csv", "--text-column", "nope"]) == 2
    assert "no column 'nope'" in _quiet(capsys)[1]
    out = tmp_path / "t.onnx"
    assert main(["export", "trun", "-o", str(out), "--exporter", "torchscript"]) == 0
    assert "example input [batch, 16]" in _quiet(capsys)[0]
