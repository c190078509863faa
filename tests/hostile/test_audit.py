"""Hostile-input audit: damaged files, hostile pickles, bad configs and bad arguments through every entry point.

Run alone with ``python -m pytest tests/hostile -q``. Every case must end in a
*clear* error: a padnet error type (``CheckpointError``, ``DatasetFormatError``,
``DatasetNotFoundError``) or ``ValueError`` / ``TypeError`` / ``FileNotFoundError``
whose message names the problem (the file, the argument or the setting) --
never a bare exception from deep inside torch, numpy, csv or PIL; never code
execution (hostile pickles try to create a marker file); never unbounded memory
(the allocation case runs in a subprocess under an address-space limit). CLI
cases must exit with status 1 or 2 and print one ``padnet VERB: error: ...``
line (or an argparse usage error), never a traceback.

"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import padnet
from padnet.cli import main
from padnet.data import CIFAR10, DatasetFormatError, DatasetNotFoundError, FashionMNIST, ImageFolder, read_idx
from padnet.data import load_movie_sentiment, load_text_csv
from padnet.io.serialization import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAR_ERRORS = (CheckpointError, DatasetFormatError, DatasetNotFoundError, ValueError, TypeError, FileNotFoundError)
# exception types that mean "a library's internals leaked out" even though they subclass ValueError
LEAKY = (UnicodeDecodeError, json.JSONDecodeError)


class RunsCode:
    """Unpickling this runs ``touch MARKER`` (what a crafted file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_clear(fn: Callable[[], object], *names: str) -> BaseException:
    """``fn()`` raises a clear error whose message contains every string in ``names``."""
    with pytest.raises(CLEAR_ERRORS) as info:
        fn()
    exc = info.value
    assert not isinstance(exc, LEAKY), f"library error leaked: {type(exc).__name__}: {exc}"
    message = str(exc)
    for name in names:
        assert name in message, f"{name!r} not in the error message {message!r}"
    return exc


def assert_cli_error(argv: list[str], capsys, *names: str) -> str:
    """The CLI exits 1/2 with a one-line ``padnet VERB: error:`` message (or an argparse error)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err, err
    assert err.strip(), "no message"
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("W1", "usage:", "  "))]
    assert any(ln.startswith(f"padnet {argv[0]}: error:") or "error:" in ln for ln in lines), err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"
    return err


# ===================================================================== model files


def _good_file(tmp_path: Path) -> Path:
    from padnet.models import create_model

    model = create_model("resnet10", num_classes=4, in_chans=1, small_input=True, width=0.125)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    return padnet.save(model, tmp_path / "good.safetensors")


def _split(raw: bytes) -> tuple[dict, dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return header, json.loads(header["__metadata__"]["padnet"]), raw[8 + n:]


def _with_meta(raw: bytes, **changes) -> bytes:
    header, meta, body = _split(raw)
    meta.update(changes)
    header["__metadata__"] = {"padnet": json.dumps(meta)}
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + body


def _with_state(raw: bytes, *, model_spec=None, config=None) -> bytes:
    """The file with its transform record's model spec and/or recorded dynamize config replaced."""
    header, meta, body = _split(raw)
    state = meta["state"]
    if model_spec is not None:
        state["model_spec"] = model_spec
    if config is not None:
        for step in state["steps"]:
            if step["op"] == "dynamize":
                step["params"]["config"] = config
    header["__metadata__"] = {"padnet": json.dumps(meta)}
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + body


def _damaged(raw: bytes, marker: Path) -> dict[str, bytes]:
    header_len = struct.unpack("<Q", raw[:8])[0]
    hostile = pickle.dumps(RunsCode(marker))
    return {
        "truncated": raw[: len(raw) // 2],
        "truncated_header": raw[:20],
        "empty": b"",
        "bitflip_header": raw[:10] + bytes([raw[10] ^ 0xFF]) + raw[11:],
        "header_length_2_60": struct.pack("<Q", 2**60) + raw[8:],
        "header_length_past_end": struct.pack("<Q", header_len + 10**6) + raw[8:],
        "zip_header": b"PK\x03\x04" + raw[4:],
        "hostile_pickle": hostile,
        "text": b"hello, I am not a model\n" * 10,
        "no_padnet_metadata": raw.replace(b'"padnet"', b'"padnot"', 1),
        "metadata_not_json": _with_meta(raw).replace(b'format_version', b'format_versio"', 1),
        "format_version_99": _with_meta(raw, format_version=99),
        "unknown_model": _with_state(raw, model_spec={"name": "nope", "kwargs": {}}),
        "bad_model_kwargs": _with_state(raw, model_spec={"name": "resnet10", "kwargs": {"num_classes": "x"}}),
        "pad_config_wrong_type": _with_state(raw, config={"version": 2, "conv": {"num_kernels": "4"}}),
        "pad_config_unknown_key": _with_state(raw, config={"version": 2, "bogus": 1}),
    }


DAMAGED_MESSAGES = {
    "unknown_model": "unknown model 'nope'",
    "bad_model_kwargs": "num_classes",
    "pad_config_wrong_type": "num_kernels",
    "pad_config_unknown_key": "bogus",
}


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory) -> bytes:
    return _good_file(tmp_path_factory.mktemp("good")).read_bytes()


@pytest.mark.parametrize("case", [
    "truncated", "truncated_header", "empty", "bitflip_header", "header_length_2_60", "header_length_past_end",
    "zip_header", "hostile_pickle", "text", "no_padnet_metadata", "metadata_not_json", "format_version_99",
    "unknown_model", "bad_model_kwargs", "pad_config_wrong_type", "pad_config_unknown_key"])
def test_load_damaged_file(case, good_raw, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_damaged(good_raw, marker)[case])
    names = (DAMAGED_MESSAGES[case],) if case in DAMAGED_MESSAGES else (str(path),)
    assert_clear(lambda: padnet.load(path), *names)
    assert not marker.exists()


@pytest.mark.parametrize("case,meta", [
    pytest.param("state_is_a_list", {"state": [1, 2]}),
    pytest.param("spec_is_a_list", {"state": {"version": 1, "model_spec": [1, 2], "steps": []}}),
    pytest.param("dtype_bogus", {"dtype": "torch.bogus"}),
    pytest.param("dtype_list", {"dtype": [1]}),
    pytest.param("temperatures_unknown_layer", {"temperatures": {"nope": 1.0}}),
    pytest.param("temperatures_list", {"temperatures": [1]}),
])
def test_load_hostile_metadata(case, meta, good_raw, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_with_meta(good_raw, **meta))
    assert_clear(lambda: padnet.load(path), str(path))


_MEMORY_PROBE = """
import resource, sys
import padnet
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    padnet.load(sys.argv[1])
    print("LOADED")
except MemoryError:
    print("MemoryError")
except Exception as e:
    print("ERROR", type(e).__name__, str(e)[:300])
"""


def test_metadata_cannot_decide_a_huge_allocation(good_raw, tmp_path):
    """Raising ``width`` in the stored spec must be refused from the tensors' shapes, not allocated."""
    _, meta, _ = _split(good_raw)
    spec = dict(meta["state"]["model_spec"])
    spec["kwargs"] = {**spec["kwargs"], "width": 64.0}  # 512x wider: gigabytes of weights
    path = tmp_path / "wide.safetensors"
    path.write_bytes(_with_state(good_raw, model_spec=spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(3 * 2**30)], capture_output=True,
                         text=True, env=env, timeout=300)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    assert line.startswith("ERROR CheckpointError") or line.startswith("ERROR ValueError"), line


def test_load_missing_and_directory(tmp_path):
    assert_clear(lambda: padnet.load(tmp_path / "nope.safetensors"), "nope.safetensors")
    assert_clear(lambda: padnet.load(tmp_path), str(tmp_path))


# ================================================================ training checkpoints


def _hostile_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"format": "padnet-train-checkpoint", "version": 1, "epoch": RunsCode(marker)}, path)


def test_checkpoint_hostile_pickle_never_runs(tmp_path):
    from padnet.train.checkpoint import load_checkpoint, read_checkpoint_file

    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "checkpoint.pt", marker)
    assert_clear(lambda: read_checkpoint_file(tmp_path / "checkpoint.pt"), "checkpoint.pt")
    assert_clear(lambda: load_checkpoint(tmp_path), "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "not_zip", "wrong_format", "missing_keys"])
def test_checkpoint_damaged(tmp_path, damage):
    from padnet.train.checkpoint import read_checkpoint_file

    path = tmp_path / "checkpoint.pt"
    state = {"format": "padnet-train-checkpoint", "version": 1, "epoch": 1, "model": b"x" * 1000,
             "optimizer": {}, "scheduler": {}, "rng": {}}
    if damage == "wrong_format":
        state["format"] = "something-else"
    if damage == "missing_keys":
        del state["optimizer"]
    torch.save(state, path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "bitflip":
        i = raw.index(b"xxxx")
        path.write_bytes(raw[:i] + b"y" + raw[i + 1:])  # the zip CRC no longer matches
    elif damage == "not_zip":
        path.write_bytes(b"\0" * 100)
    assert_clear(lambda: read_checkpoint_file(path), str(path))


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_cli_resume_hostile_checkpoint(tmp_path, capsys):
    from padnet.train import resolve_config

    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve_config({"variant": "static", "width": 0.125, "max_train_samples": 64, "max_test_samples": 32,
                          "batch_size": 32, "epochs": 1, "quiet": True, "output_dir": str(out)})
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    marker = tmp_path / "pwned"
    _hostile_checkpoint(out / "checkpoint.pt", marker)
    assert_cli_error(["train", "--resume", "--output-dir", str(out)], capsys, "checkpoint.pt")
    assert not marker.exists()


# ======================================================================= configs


CONFIG_CASES = {
    "bad.yaml": (b"epochs: [1, 2\n", "not valid YAML"),
    "python_tag.yaml": (b"epochs: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
    "aliases.yaml": (b"a: &a [1, 1, 1, 1]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n", "aliases"),
    "list.yaml": (b"- 1\n- 2\n", "must hold a mapping"),
    "binary.yaml": (bytes(range(256)), "not UTF-8"),
    "bad.json": (b'{"epochs": 1,,}', "not valid JSON"),
    "unknown.yaml": (b"epochz: 3\n", "unknown setting 'epochz'"),
    "bool.yaml": (b"augment: 'perhaps'\n", "augment must be a boolean"),
    "nested.yaml": (b"options: 3\n", "'options' must be a mapping"),
    "pad_config.yaml": (b"pad_config: [1]\n", "'pad_config' must be a mapping"),
    "nan.yaml": (b"lr: .nan\n", "lr must be a number > 0"),
    "inf.yaml": (b"weight_decay: .inf\n", "weight_decay must be a number >= 0"),
    "min_lr.yaml": (b"lr: 0.01\nmin_lr: 0.1\n", "min_lr (0.1) must not exceed lr (0.01)"),
    "device.yaml": (b"device: bogus\n", "unknown device 'bogus'"),
    "kernels.yaml": (b"num_kernels: 2.5\n", "num_kernels must be an integer"),
    "ratio.yaml": (b"ratio: 7\n", "(0, 1]"),
    "data_dir.yaml": (b"data_dir: [1]\n", "data_dir must be a string"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_file(name, tmp_path, monkeypatch):
    from padnet.train.config import load_config_file, resolve_config

    monkeypatch.chdir(tmp_path)
    data, message = CONFIG_CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert_clear(lambda: resolve_config({}, load_config_file(path)), message)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["bad.yaml", "python_tag.yaml", "binary.yaml", "min_lr.yaml", "device.yaml"])
def test_cli_config_file(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, message = CONFIG_CASES[name]
    (tmp_path / name).write_bytes(data)
    assert_cli_error(["train", "--config", name, "--output-dir", "r"], capsys, message)
    assert not (tmp_path / "r").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text,message", [
    ("{", "malformed"), ("[1]", "PadConfig"), ('{"bogus": 1}', "unknown PadConfig"),
    ('{"num_kernels": "4"}', "num_kernels"), ('{"noise_std": NaN}', "noise_std"),
    ('{"target_modules": "a[("}', "not a valid regular expression"), ('{"dynamic_ratio": 2}', "(0, 1]"),
    ('{"version": 9}', "version 9"),
])
def test_pad_config_json(text, message):
    assert_clear(lambda: padnet.PadConfig.from_json(text), message)


# ====================================================================== datasets


def _idx(shape: tuple[int, ...], code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape)


@pytest.mark.parametrize("name,data,message", [
    ("short", b"\0\0", "too short"),
    ("magic", b"\1\2\3\4" + b"\0" * 100, "bad idx magic"),
    ("truncated", _idx((10, 28, 28)) + b"\0" * 100, "payload is 100 bytes"),
    ("huge_header", _idx((2**31, 2**31, 2**31)) + b"\0" * 16, "truncated or corrupt"),
    ("dims", _idx((4,)) + b"\0" * 4, "expected an idx file with 3 dims"),
])
def test_read_idx_damaged(tmp_path, name, data, message):
    path = tmp_path / f"{name}-idx3-ubyte"
    path.write_bytes(data)
    assert_clear(lambda: read_idx(path, ndim=3), str(path), message)


def test_gzip_damaged(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx((1, 2, 2)) + b"\0" * 4)[:-10])
    assert_clear(lambda: read_idx(path), str(path))


def test_fashion_mnist_inconsistent_files(tmp_path):
    for prefix, n_img, n_lab in (("train", 3, 2), ("t10k", 2, 2)):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx((n_img, 28, 28)) + b"\0" * (n_img * 784))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", n_lab)
                                                               + b"\0" * n_lab)
    assert_clear(lambda: FashionMNIST(tmp_path), "3 images", "2 labels")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\x00\x63")
    assert_clear(lambda: FashionMNIST(tmp_path, train=False), "label 99 out of range")


def _cifar_dir(folder: Path, replace: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
        if replace and name in replace:
            obj = replace[name]
        (folder / name).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
    return folder


@pytest.mark.parametrize("case", ["hostile", "truncated", "not_a_dict", "wrong_shape", "label_range", "float_data",
                                  "eval_global", "huge_file"])
def test_cifar_damaged(tmp_path, case):
    marker = tmp_path / "pwned"
    good = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
    replace = {
        "hostile": RunsCode(marker),
        "truncated": good[: len(good) // 2],
        "not_a_dict": [1, 2, 3],
        "wrong_shape": {b"data": np.zeros((1, 100), np.uint8), b"labels": [0]},
        "label_range": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]},
        "float_data": {b"data": np.zeros((1, 3072), np.float32), b"labels": [0]},
        "eval_global": b"cbuiltins\neval\n(Vprint(1)\ntR.",
        "huge_file": None,
    }[case]
    folder = _cifar_dir(tmp_path / "c", {"test_batch": replace} if replace is not None else None)
    if case == "huge_file":
        with open(folder / "test_batch", "r+b") as f:
            f.truncate(300 * 2**20)  # sparse: 300 MB of zeros without using the disk
    assert_clear(lambda: CIFAR10(folder, train=False), "test_batch")
    assert not marker.exists()


def test_image_folder_damaged_and_bomb(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("a", "b"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (40, 40)).save(tmp_path / split / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    ds = ImageFolder(tmp_path, image_size=8)
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png")
    assert_clear(lambda: ds[broken], "broken.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40x40 image is now a decompression bomb
    ok = next(i for i, (p, _) in enumerate(ds.samples) if p.name == "ok.png")
    assert_clear(lambda: ds[ok], "ok.png")
    assert_clear(lambda: ImageFolder(tmp_path / "nope"), "nope")


@pytest.mark.parametrize("name,data,message", [
    ("latin1.csv", "text,label\nna\u00efve,a\n".encode("latin-1"), "not valid utf-8"),
    ("huge_field.csv", b'text,label\n"' + b"x" * 200_000 + b'",a\n', "malformed CSV"),
    ("missing_col.csv", b"body,label\nx,a\n", "no column 'text'"),
    ("empty_label.csv", b"text,label\nx,\n", "lacks a value"),
    ("bad.jsonl", b'{"text": "x", "label": 1}\n{nope\n', "bad.jsonl:2"),
    ("not_objects.jsonl", b"[1, 2]\n", "must be an object"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    ("gz_broken.csv.gz", gzip.compress(b"text,label\nx,a\n")[:-12], "cannot read file"),
    ("wrong.ext", b"text,label\n", "unsupported extension"),
])
def test_text_files_damaged(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    assert_clear(lambda: load_text_csv(path, test_fraction=0.0), message)


def test_movie_sentiment_damaged(tmp_path):
    path = tmp_path / "movieReviewSnippets_GroundTruth.csv"
    path.write_bytes(b"id,sentiment,text\n1,abc,good\n")
    assert_clear(lambda: load_movie_sentiment(path), "bad rating 'abc'")
    path.write_bytes(b"a,b\n")
    assert_clear(lambda: load_movie_sentiment(path), "expected header")
    path.write_bytes("id,sentiment,text\n1,1.0,caf\u00e9\n".encode("latin-1"))
    assert_clear(lambda: load_movie_sentiment(path), "not valid utf-8")


# =================================================================== CLI arguments


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return _good_file(tmp_path_factory.mktemp("cli"))


CLI_CASES = [
    (["count", "--model", "resnet10", "--ratio", "2"], "(0, 1]"),
    (["count", "--model", "resnet10", "--ratio", "nan"], "(0, 1]"),
    (["count", "--model", "resnet10", "--variant", "static", "--ratio", "0.5"], "only meaningful"),
    (["count", "--model", "resnet10", "--num-classes", "0"], "--num-classes must be >= 1"),
    (["count", "--model", "nope"], "invalid choice"),
    (["count", "--model", "resnet10", "--num-kernels", "x"], "invalid int value"),
    (["partition", "{missing}"], "missing.safetensors"),
    (["partition", "{damaged}"], "damaged.safetensors"),
    (["partition", "{model}", "--ratio", "0", "--criterion", "magnitude"], "(0, 1]"),
    (["partition", "{model}", "--iterations", "0", "--criterion", "magnitude"], "--iterations must be >= 1"),
    (["partition", "{model}", "--criterion", "nope"], "nope"),
    (["partition", "{model}"], "needs data"),
    (["train", "--lr", "nan"], "lr must be a number > 0"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["train", "--variant", "half"], "unknown variant 'half'"),
    (["train", "--set", "pad_config.num_kernels=x"], "num_kernels"),
    (["train", "--set", "augment=perhaps"], "augment must be a boolean"),
    (["train", "--set", "nope=1"], "unknown setting 'nope'"),
    (["train", "--set", "noequals"], "KEY=VALUE"),
    (["train", "--recipe", "cifar10", "--data-dir", "{tmp}/nowhere"], "nowhere"),
    (["train", "--resume", "--output-dir", "{tmp}/nothing-here"], "cannot resume"),
    (["train", "--device", "cuda:x"], "unknown device"),
    (["evaluate", "{tmp}"], "not a padnet training run"),
    (["evaluate", "{badrun}"], "config.json"),
    (["compare", "{tmp}/a", "{tmp}/b"], "no complete run"),
    (["compare", "{badsummary}"], "summary.json"),
    (["export", "{missing}", "-o", "{tmp}/x.onnx"], "missing.safetensors"),
    (["export", "{damaged}", "-o", "{tmp}/x.onnx"], "damaged.safetensors"),
    (["export", "{model}", "-o", "{tmp}/x.onnx", "--batch", "1"], "--batch must be >= 2"),
    (["export", "{model}", "-o", "{tmp}/x.onnx", "--input-shape", "1,0,3"], "--input-shape"),
    (["export", "{model}", "-o", "{tmp}/x.onnx", "--opset", "5"], "opset must be >= 17"),
    (["export", "{model}", "-o", "{tmp}", "--format", "safetensors"], "is a directory"),
    (["export", "{model}", "-o", "{tmp}/x.onnx", "--seq-len", "8"], "--seq-len is for text models"),
    (["predict", "{missing}", "x.png"], "missing.safetensors"),
    (["predict", "{damaged}", "x.png"], "damaged.safetensors"),
    (["predict", "{model}", "{tmp}/x.png"], "no such file"),
    (["predict", "{model}", "{model}", "-o", "{tmp}/out.txt"], "use a .csv, .tsv or .jsonl"),
    (["demo", "--data-dir", "{tmp}/nowhere", "--output-dir", "{tmp}/demo"], "nowhere"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a[:2]) + f"#{i}" for i, (a, _) in
                                                         enumerate(CLI_CASES)])
def test_cli_bad_arguments(argv, message, tmp_path, model_file, good_raw, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "damaged.safetensors").write_bytes(good_raw[: len(good_raw) // 3])
    badrun = tmp_path / "badrun"
    badrun.mkdir()
    (badrun / "config.json").write_text("{not json")
    (badrun / "model.safetensors").write_bytes(good_raw)
    badsummary = tmp_path / "badsummary"
    badsummary.mkdir()
    (badsummary / "summary.json").write_text('{"test_accuracy": ')
    subs = {"{missing}": str(tmp_path / "missing.safetensors"), "{damaged}": str(tmp_path / "damaged.safetensors"),
            "{model}": str(model_file), "{tmp}": str(tmp_path), "{badrun}": str(badrun),
            "{badsummary}": str(badsummary)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    if args[0] == "train" and "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "run")]
    assert_cli_error(args, capsys, message)
    if args[0] == "train" and "--resume" not in args:
        assert not (tmp_path / "run").exists(), "a failed command wrote the run directory"
