"""Regression tests for issue 14's bad and hostile inputs (items 9, 11, 12, 13, 15).

Each test failed before its fix: a hostile CIFAR pickle ran code, NaN passed
checks, string booleans were truthy, errors left runs that could not be
restarted, resume rules contradicted each other.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.cli import main
from padnet.data import CIFAR10, DatasetFormatError, load_text_csv
from padnet.train import resolve_config, train
from padnet.train.config import TrainConfig, load_config_file

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------- item 9: CIFAR-10


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a crafted data file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_py(folder: Path, hostile: dict | None = None, per_batch: int = 2, protocol: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(per_batch)], b"filenames": [b"a.png"] * per_batch}
        if hostile and name in hostile:
            batch = hostile[name]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_release_still_reads(tmp_path, protocol):
    _cifar_py(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = CIFAR10(tmp_path)
    assert len(ds) == 10 and ds.data.dtype == torch.uint8 and ds.data.shape == (10, 32, 32, 3)


def test_cifar_hostile_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    _cifar_py(tmp_path / "c", hostile={"data_batch_3": _RunsCode(marker)})
    with pytest.raises(DatasetFormatError, match=r"data_batch_3.*refused to load global (posix|os)\.system"):
        CIFAR10(tmp_path / "c")
    assert not marker.exists()
    # nested inside the expected dict, and in the class-name file
    _cifar_py(tmp_path / "d", hostile={"test_batch": {b"data": np.zeros((1, 3072), np.uint8),
                                                      b"labels": [_RunsCode(marker)]}})
    with pytest.raises(DatasetFormatError, match="refused"):
        CIFAR10(tmp_path / "d", train=False)
    _cifar_py(tmp_path / "e")
    with open(tmp_path / "e" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": _RunsCode(marker)}, f)
    with pytest.raises(DatasetFormatError, match="refused"):
        CIFAR10(tmp_path / "e")
    assert not marker.exists()


class _Obj:
    pass


def test_cifar_refuses_objects_and_huge_arrays(tmp_path):
    _cifar_py(tmp_path / "o", hostile={"test_batch": {b"data": np.array([_Obj()], dtype=object), b"labels": [0]}})
    with pytest.raises(DatasetFormatError):
        CIFAR10(tmp_path / "o", train=False)
    # a reconstruct call asking numpy for a terabyte-sized array is refused before allocating
    payload = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01J\x00\x00\x00\x01"
               b"J\x00\x00\x00\x01\x86q\x02C\x01bq\x03\x87q\x04Rq\x05.")
    _cifar_py(tmp_path / "h")
    (tmp_path / "h" / "test_batch").write_bytes(payload)
    with pytest.raises(DatasetFormatError, match="refused array reconstruction"):
        CIFAR10(tmp_path / "h", train=False)


def test_cifar_binary_release(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 3, dtype=np.uint8)
        pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        (folder / f"{name}.bin").write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())
        expected[name] = (labels, pixels)
    (folder / "batches.meta.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n\n")
    test = CIFAR10(tmp_path, train=False)
    labels, pixels = expected["test_batch"]
    assert test.targets.tolist() == labels.tolist() and test.classes[3] == "k3"
    assert np.array_equal(test.data[1].numpy(), pixels[1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(CIFAR10(tmp_path)) == 15
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)  # truncated record
    with pytest.raises(DatasetFormatError, match="not a whole number"):
        CIFAR10(tmp_path, train=False)


# --------------------------------------------------- item 11: silent wrong answers


def test_pad_config_rejects_nan_and_strings():
    with pytest.raises(ValueError, match="noise_std must be a finite number"):
        padnet.PadConfig(noise_std=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        padnet.PadConfig(temperature=float("inf"))
    with pytest.raises(TypeError, match=r"num_kernels \(K\) must be an int >= 1, got '4'"):
        padnet.PadConfig(num_kernels="4")
    with pytest.raises(TypeError, match="temperature must be a number, got '2'"):
        padnet.PadConfig(temperature="2")
    with pytest.raises(TypeError, match=r"num_kernels \(K\) must be an int >= 1, got 2.5"):
        padnet.PadConfig(num_kernels=2.5)
    with pytest.raises(TypeError, match="num_kernels"):
        padnet.PadConfig.from_dict({"num_kernels": "4"})


def test_bad_target_regex_names_the_pattern():
    with pytest.raises(ValueError, match=r"target_modules: 'layer\[1' is not a valid regular expression"):
        padnet.PadConfig(target_modules="layer[1")
    with pytest.raises(ValueError, match=r"exclude_modules: '\(\?P<' is not a valid"):
        padnet.PadConfig(exclude_modules="(?P<")


def _partition_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    padnet.dynamize_(model, padnet.PadConfig(target_modules=["3"], seed=0))
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_partition_refuses_non_finite_loss(bad):
    model = _partition_model()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    masks = [b.clone() for n, b in model.named_buffers() if "mask" in n]

    def loss_fn(out, target):
        return F.cross_entropy(out, target) * bad

    with pytest.raises(ValueError, match=rf"loss of scoring batch 0 is {bad}"):
        padnet.partition_(model, [(x, y)], loss_fn, ratio=0.5, criterion="taylor", iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(masks, [b for n, b in model.named_buffers() if "mask" in n]))


def test_export_verification_fails_on_nan():
    from padnet.commands.export import compare_outputs

    ref = torch.ones(2, 3)
    assert compare_outputs(ref, ref.clone())[0]
    got = ref.clone()
    got[0, 0] = float("nan")
    ok, _, message = compare_outputs(ref, got)
    assert not ok and "NaN" in message
    ok, _, message = compare_outputs(torch.full((2, 3), float("nan")), torch.full((2, 3), float("nan")))
    assert not ok and "eager model" in message
    assert not compare_outputs(ref, ref + 1.0)[0]
    assert not compare_outputs(ref, torch.ones(3, 2))[0]


@pytest.mark.parametrize("word,expected", [("false", False), ("no", False), ("off", False), ("0", False),
                                           ("False", False), ("true", True), ("yes", True), ("on", True)])
def test_yaml_string_booleans_parse_strictly(tmp_path, word, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"augment: '{word}'\nnesterov: '{word}'\nflip: '{word}'\n")
    cfg = resolve_config({}, load_config_file(path))
    assert cfg.augment is expected and cfg.nesterov is expected and cfg.options["flip"] is expected


@pytest.mark.parametrize("key", ["augment", "nesterov", "quiet", "flip"])
def test_yaml_boolean_garbage_is_an_error(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: 'maybe'\n")
    with pytest.raises(ValueError, match=f"{key} must be a boolean.*'maybe'"):
        resolve_config({}, load_config_file(path))


def test_numeric_strings_and_min_lr(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-2\nmin_lr: 1e-4\nepochs: '3'\n")  # YAML 1.1 reads 1e-2 as a string
    cfg = resolve_config({}, load_config_file(path))
    assert cfg.lr == 0.01 and cfg.min_lr == 1e-4 and cfg.epochs == 3
    with pytest.raises(ValueError, match=r"min_lr \(0.5\) must not exceed lr \(0.1\)"):
        resolve_config({"lr": 0.1, "min_lr": 0.5})
    with pytest.raises(ValueError, match="num_kernels must be an integer"):
        resolve_config({"num_kernels": "four"})
    with pytest.raises(ValueError, match="temperature_start must be a number"):
        resolve_config({"temperature_start": "hot"})


def test_non_utf8_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\u00e9 ok,a\nna\u00efve,b\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"d.csv: not valid utf-8 text .*line 2.*encoding"):
        load_text_csv(path)
    splits = load_text_csv(path, encoding="latin-1", test_fraction=0.0)
    assert sorted(splits.train_texts) == ["café ok", "naïve"]
    # valid UTF-8 (with a BOM) is never turned into mojibake
    path.write_bytes("\ufefftext,label\ncaf\u00e9,a\n\u6f22\u5b57,b\n".encode("utf-8"))
    assert sorted(load_text_csv(path, test_fraction=0.0).train_texts) == ["café", "漢字"]
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        load_text_csv(path, encoding="klingon")


# ------------------------------------------------------- item 12: obscure crashes


def test_device_argument_is_checked():
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        resolve_config({"device": "bogus"})
    assert resolve_config({"device": "cpu"}).device == "cpu"


def test_cli_bad_device_is_one_line(tmp_path, capsys):
    assert main(["train", "--device", "bogus", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'bogus'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _tiny_vision_run_args(out: Path) -> list[str]:
    return ["train", "--variant", "static", "--width", "0.125", "--max-train-samples", "64", "--max-test-samples",
            "32", "--batch-size", "32", "--epochs", "1", "--quiet", "--output-dir", str(out)]


FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")


@needs_fashion
def test_disk_full_is_a_clear_message(tmp_path, capsys, monkeypatch):
    import padnet.io.serialization as serialization

    real = serialization.atomic_write

    def full(path, write):
        if Path(path).name == "model.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(serialization, "atomic_write", full)
    assert main(_tiny_vision_run_args(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and "model.safetensors" in err
    assert "Traceback" not in err


def test_checkpoint_write_failure_becomes_os_error(tmp_path, monkeypatch):
    from padnet.train import checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError) as info:
        checkpoint.save_checkpoint(tmp_path, {"epoch": 1})
    assert info.value.errno in (errno.ENOSPC, errno.EIO) and "inline_container" in str(info.value)
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_read_only_output_is_a_clear_message(tmp_path, capsys, monkeypatch):
    """A read-only output directory (simulated: the tests may run as root, which ignores permissions)."""
    import padnet.train.loop as loop

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(loop.Path, "mkdir", read_only)
    monkeypatch.setattr(loop, "preflight", lambda *a, **k: None)
    monkeypatch.setattr(loop.Recipe, "validate", lambda *a, **k: None, raising=False)
    from padnet.train.recipes.vision import FashionMNISTRecipe

    monkeypatch.setattr(FashionMNISTRecipe, "validate", lambda *a, **k: None)
    assert main(_tiny_vision_run_args(tmp_path / "ro")) == 1
    err = capsys.readouterr().err
    assert "read-only file system" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["export", "missing.safetensors", "-o", str(ro / "m.onnx")]) == 2
        model = nn.Sequential(nn.Linear(2, 2))
        with pytest.raises(OSError):
            padnet.save(model, ro / "m.safetensors")
    finally:
        ro.chmod(0o700)


# --------------------------------------- item 13: errors before the run directory


@pytest.mark.parametrize("settings,message", [
    ({"pad_config": {"num_kernels": "4"}}, r"pad_config .*num_kernels \(K\) must be an int"),
    ({"pad_config": {"target_modules": "layer[1"}}, "not a valid regular expression"),
    ({"partition_warmup_steps": 50}, "partition_warmup_steps=50 must be below the run's 2 optimizer steps"),
    ({"warmup_steps": 10}, "warmup_steps=10 must be below the run's 2 optimizer steps"),
])
@needs_fashion
def test_config_errors_write_nothing(tmp_path, settings, message):
    out = tmp_path / "run"
    cfg = resolve_config({"variant": "pad", "width": 0.125, "max_train_samples": 64, "max_test_samples": 32,
                          "batch_size": 32, "epochs": 1, "quiet": True, "output_dir": str(out), **settings})
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not out.exists()


@needs_fashion
def test_run_that_never_checkpointed_restarts_without_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = {"variant": "static", "width": 0.125, "max_train_samples": 64, "max_test_samples": 32,
                "batch_size": 32, "epochs": 1, "quiet": True, "output_dir": str(out), "lr": 0.1}
    import padnet.train.loop as loop

    real = loop.Trainer._train_epoch

    def nan_at_step0(self, model, epoch):
        raise FloatingPointError("loss became nan at step 0 (epoch 1); lower --lr or enable grad_clip")

    monkeypatch.setattr(loop.Trainer, "_train_epoch", nan_at_step0)
    with pytest.raises(FloatingPointError):
        train(resolve_config(settings))
    assert (out / "config.json").exists() and not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(loop.Trainer, "_train_epoch", real)
    s = train(resolve_config({**settings, "lr": 0.05}))  # the corrected command, no --overwrite
    assert s["complete"] and json.loads((out / "config.json").read_text())["lr"] == 0.05


# ------------------------------------------------------------ item 15: one rule


def test_resume_world_size_rule(tmp_path):
    from padnet.train.loop import resume_config, world_size_rule

    with pytest.raises(ValueError) as info:
        world_size_rule(2, 1, tmp_path)
    msg = str(info.value)
    assert "written by 2 process(es) but this resume runs 1" in msg and "--nproc 2" in msg
    assert "torchrun --nproc-per-node 2" in msg
    world_size_rule(2, 2, tmp_path)
    # the command the message suggests is accepted: --nproc may be given when resuming
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(nproc=1).to_dict()))
    assert resume_config(tmp_path, {"nproc": 2}).nproc == 2


def test_resume_of_torchrun_run_with_nproc(tmp_path, monkeypatch):
    """A run written by 2 torchrun processes: plain resume and --nproc 2 give one consistent answer."""
    import padnet.train.loop as loop

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(nproc=1, output_dir=str(tmp_path)).to_dict()))
    monkeypatch.setattr(loop, "load_checkpoint", lambda out: {"world_size": 2, "path": str(out)})
    spawned = []
    plain, with_nproc = loop.resume_config(tmp_path, {}), loop.resume_config(tmp_path, {"nproc": 2})
    monkeypatch.setattr(loop.D, "spawn", lambda fn, args, nproc: spawned.append(nproc))
    monkeypatch.setattr(loop, "read_json", lambda p: {"ok": True})
    monkeypatch.setattr(loop, "preflight", lambda *a, **k: None)
    from padnet.train.recipes.vision import FashionMNISTRecipe

    monkeypatch.setattr(FashionMNISTRecipe, "validate", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"resume with the same number of processes: .*--nproc 2"):
        train(plain, resume=True)
    assert train(with_nproc, resume=True) == {"ok": True}
    assert spawned == [2]


def test_dtype_and_device_arguments():
    from padnet.data.transforms import ToFloat
    from padnet.train.distributed import resolve_device

    assert ToFloat("torch.float16").dtype == torch.float16 and ToFloat("bfloat16").dtype == torch.bfloat16
    assert ToFloat(torch.float64)(torch.zeros(2, 2, dtype=torch.uint8)).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be one of .*got 'torch.bogus'"):
        ToFloat("torch.bogus")
    with pytest.raises(ValueError, match="floating-point dtype"):
        ToFloat(torch.int64)
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        resolve_device("bogus")


def test_cli_evaluate_and_predict_bad_device(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    padnet.save(model, run / "model.safetensors")
    assert main(["evaluate", str(run), "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'bogus'" in err and "Traceback" not in err
    assert main(["predict", str(run), str(tmp_path / "x.png"), "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'bogus'" in err and "Traceback" not in err


# ------------------------------------------------------- siblings found after the merge


def test_load_rejects_a_bogus_map_location_before_reading(tmp_path):
    missing = tmp_path / "never_read.safetensors"  # not read: the device is checked first
    with pytest.raises(ValueError, match="map_location 'bogus' is not a device"):
        padnet.load(missing, map_location="bogus")


@pytest.mark.parametrize("shapes", ["64", "64@x", "0@8", "64@32,@"])
def test_bench_rejects_malformed_shapes(shapes, capsys):
    from padnet.cli import main

    assert main(["bench", "--suite", "layers", "--shapes", shapes, "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "--shapes" in err and "Traceback" not in err


def test_temperature_layers_are_found_structurally():
    from padnet.layers.modes import temperature_layers
    from padnet.models import create_model

    model = create_model("resnet10", num_classes=3, in_chans=1, small_input=True, width=0.125)
    padnet.dynamize_(model, padnet.PadConfig(seed=0))
    names = [n for n, _ in temperature_layers(model)]
    assert names and all(isinstance(model.get_submodule(n), padnet.layers.DynamicConv2d) for n in names)
    padnet.compact_(model)
    assert [n for n, _ in temperature_layers(model)] == names  # the deploy form keeps its temperature
