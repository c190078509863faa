"""padnet.train: config resolution, recipes, schedules, checkpoints, outputs and CLI errors (fast tests).

The slower end-to-end runs (the must-show Fashion-MNIST run, kill + resume,
two processes, the demo) are in tests/test_train_e2e.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import padnet
from padnet.cli import main
from padnet.data import DEFAULT_FASHION_MNIST_ROOT
from padnet.serialization import CheckpointError
from padnet.train import TrainConfig, resolve_config, train
from padnet.train.checkpoint import PREVIOUS, load_checkpoint, save_checkpoint
from padnet.train.recipes import DataBundle, Recipe, get_recipe, list_recipes, lr_factor_fn, register_recipe
from padnet.train.recipes.base import unregister_recipe

HAVE_FMNIST = (DEFAULT_FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists() or (
    DEFAULT_FASHION_MNIST_ROOT / "train-images-idx3-ubyte").exists()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

TINY = ["--width", "0.125", "--max-train-samples", "256", "--max-test-samples", "128", "--batch-size", "64",
        "--epochs", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- recipes


def test_builtin_recipes_registered():
    names = list_recipes()
    for name in ("fashion-mnist", "cifar10", "imagefolder"):
        assert name in names
    r = get_recipe("fashion-mnist")
    assert r.defaults["model"] == "resnet10" and r.defaults["width"] == 0.5


def test_unknown_recipe_lists_known_ones(capsys):
    with pytest.raises(ValueError, match="known recipes: .*fashion-mnist"):
        get_recipe("mnist-but-wrong")
    assert main(["train", "--recipe", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "cifar10" in err


def test_list_recipes_flag(capsys):
    assert main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "imagefolder" in out


# -------------------------------------------------------------------- config


def test_precedence_recipe_defaults_file_flags(tmp_path):
    cfg = resolve_config({})
    assert (cfg.recipe, cfg.variant, cfg.ratio, cfg.model, cfg.batch_size) == (
        "fashion-mnist", "pad", 0.3, "resnet10", 64)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 7\nlr: 0.2\nbatch-size: 32\ncrop_padding: 4\nvariant: static\n")
    cfg = resolve_config({"lr": 0.05}, _load(yaml_file))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.variant, cfg.ratio) == (7, 0.05, 32, "static", None)
    assert cfg.options["crop_padding"] == 4
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"recipe": "cifar10", "options": {"flip": False}, "seed": 3}))
    cfg = resolve_config({"seed": 4}, _load(json_file))
    assert (cfg.recipe, cfg.model, cfg.seed, cfg.options["flip"], cfg.options["crop_padding"]) == (
        "cifar10", "resnet18", 4, False, 4)
    # round trip through config.json
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _load(path):
    from padnet.train import load_config_file

    return load_config_file(path)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        resolve_config({"epoch": 3})
    with pytest.raises(ValueError, match="only meaningful with --variant pad"):
        resolve_config({"variant": "static", "ratio": 0.3})
    with pytest.raises(ValueError, match="only meaningful with --variant pad"):
        resolve_config({"variant": "dynamic", "ratio": 0.5})
    with pytest.raises(ValueError, match="unknown variant"):
        resolve_config({"variant": "semi"})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_config({"ratio": 1.5})
    with pytest.raises(ValueError, match="unknown criterion"):
        resolve_config({"criterion": "vibes"})
    with pytest.raises(ValueError, match="unknown model"):
        resolve_config({"model": "resnet9000"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        _load(bad)
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("argv, message", [
    (["--variant", "static", "--ratio", "0.3"], "--ratio is only meaningful with --variant pad"),
    (["--variant", "semi"], "unknown variant 'semi'"),
    (["--ratio", "0"], "must be in (0, 1]"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--config", "/nonexistent/train.yaml"], "config file /nonexistent/train.yaml not found"),
    (["--set", "nonsense=1"], "unknown setting 'nonsense'"),
])
def test_cli_bad_input_exits_2(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *argv, "--output-dir", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(out), *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST" in err and "apt-get install dataset-fashion-mnist" in err
    assert not out.exists()  # nothing written before the data is found
    assert main(["train", "--recipe", "cifar10", "--output-dir", str(out), *TINY]) == 2
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    assert main(["train", "--recipe", "imagefolder", "--data-dir", str(tmp_path), "--output-dir", str(out),
                 *TINY]) == 2
    assert "train/<class>" in capsys.readouterr().err


# ----------------------------------------------------------------- schedules


def test_lr_schedule_warmup_cosine_linear():
    f = lr_factor_fn("cosine", total_steps=100, warmup_steps=10, min_factor=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    g = lr_factor_fn("linear", total_steps=100, warmup_steps=0, min_factor=0.1)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.55) and g(100) == pytest.approx(0.1)
    assert lr_factor_fn("constant", 10, 0, 0.0)(7) == 1.0


def test_weight_decay_not_on_bn_bias_scale():
    cfg = resolve_config({"width": 0.125})
    recipe = get_recipe("fashion-mnist")
    model = recipe.build_model(cfg, DataBundle([], [], num_classes=10))
    recipe.dynamize(cfg, model)
    opt = recipe.build_optimizer(cfg, model)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2), name
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


# ---------------------------------------------------------------- checkpoints


def _state(epoch):
    return {"epoch": epoch, "global_step": epoch * 10, "model": b"x", "optimizer": {}, "scheduler": {},
            "rng": [{}], "metrics": [{"epoch": epoch}]}


def test_checkpoint_rotation_and_fallback(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    assert not (tmp_path / PREVIOUS).exists()
    save_checkpoint(tmp_path, _state(2))
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert (tmp_path / PREVIOUS).exists()
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage, e.g. a disk full mid-write")
    with pytest.warns(UserWarning, match="checkpoint.pt.*previous checkpoint"):
        state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1 and state["path"].endswith(PREVIOUS)
    (tmp_path / PREVIOUS).write_bytes(b"also garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt: corrupt"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


# ------------------------------------------------------------- a tiny PAD run


@pytest.fixture(scope="module")
def tiny_pad_run(tmp_path_factory):
    """A tiny PAD run (data-free magnitude partition for speed), 2 epochs."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("runs") / "tiny-pad"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", "--variant", "pad", "--ratio", "0.5", "--criterion", "magnitude",
                   "--partition-iterations", "2", "--temperature-epochs", "1", "--temperature-end", "1", *TINY,
                   "--epochs", "2", "--output-dir", str(out)])  # explicit end: the recipe default is 3 since issue 11
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return out


@needs_fmnist
def test_tiny_run_outputs(tiny_pad_run):
    out = tiny_pad_run
    for f in ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "report.md", "curves.png",
              "modes.png", "checkpoint.pt", "checkpoint.prev.pt", "train.log"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["criterion"] == "magnitude" and cfg["width"] == 0.125 and cfg["options"]["crop_padding"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "temperature",
                          "seconds"}
    assert rows[0]["temperature"] == pytest.approx(1.0)  # annealed over the first epoch (<= half the run)
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["variant"] == "pad" and s["ratio"] == 0.5 and s["seed"] == 0
    assert s["test_accuracy"] == rows[-1]["test_accuracy"]
    assert s["best_test_accuracy"] == max(r["test_accuracy"] for r in rows)
    p, full, static = s["params"], s["params_fully_dynamic"], s["params_static"]
    assert set(p) == {"total", "static", "dynamic", "router", "other"}
    assert p["total"] > p["dynamic"] > 0 and p["static"] > 0
    assert static["total"] < p["total"] < full["total"]
    assert s["partition"]["criterion"] == "magnitude" and s["partition"]["ratio"] == pytest.approx(0.5, abs=1e-3)
    assert s["dynamic_ratio"] == pytest.approx(0.5, abs=1e-3)
    assert s["flops"] > 0 and s["train_seconds"] > 0
    model = padnet.load(out / "model.safetensors")
    assert padnet.count_parameters(model).to_dict() == p
    report = (out / "report.md").read_text()
    assert "Deployable size" in report and "fully dynamic" in report and "Mode partition" in report
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["masks"] and ckpt["temperature"] == pytest.approx(1.0)
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}


@needs_fmnist
def test_evaluate_and_compare(tiny_pad_run, tmp_path, capsys):
    out = tiny_pad_run
    assert main(["evaluate", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert ev["num_test_samples"] == 128
    assert ev["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert "test accuracy" in capsys.readouterr().out
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    table_file = tmp_path / "table.md"
    assert main(["compare", str(out), str(incomplete), "--output", str(table_file)]) == 0
    captured = capsys.readouterr()
    assert "incomplete run" in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("| run | variant | kappa | seed | test acc | best acc | params total")
    assert len(lines) == 3 and "| pad | 0.5 | 0 |" in lines[2]
    assert table_file.read_text().strip() == captured.out.strip()
    assert main(["compare", str(incomplete)]) == 2
    assert main(["evaluate", str(incomplete)]) == 2


@needs_fmnist
def test_refuses_to_clobber_and_resume_of_complete_run(tiny_pad_run, capsys):
    out = tiny_pad_run
    assert main(["train", "--variant", "pad", "--criterion", "magnitude", *TINY, "--output-dir", str(out)]) == 2
    assert "already holds a completed run" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(out), "--quiet"]) == 0
    assert main(["train", "--resume", "--output-dir", str(out), "--epochs", "5"]) == 2
    assert "cannot change epochs when resuming" in capsys.readouterr().err


# ------------------------------------------------- failures and generic inputs


class _ToyDictDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, 8, generator=g)
        self.y = (self.x.mean(dim=(1, 2)) > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"tokens": self.x[i], "mask": torch.ones(6)}, int(self.y[i])


class _ToyModel(nn.Module):
    """Dict inputs (like a BERT model) and a Sequential FFN that dynamize_ turns into an MoE."""

    def __init__(self):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, tokens, mask):
        h = tokens + self.ffn(tokens)
        return {"logits": self.head((h * mask[..., None]).mean(1))}


class _ToyRecipe(Recipe):
    name = "toy-dict"
    description = "toy: dict inputs, MoE, warm-up partition"
    defaults = {"model": "toy", "epochs": 2, "batch_size": 16, "lr": 1e-2, "optimizer": "adamw",
                "lr_schedule": "linear", "warmup_steps": 2, "weight_decay": 0.01, "partition_warmup_steps": 3,
                "partition_batches": 2, "augment": False}
    calls = 0

    def build_data(self, cfg):
        return DataBundle(_ToyDictDataset(64, 0), _ToyDictDataset(32, 1), num_classes=2)

    def build_model(self, cfg, data):
        return _ToyModel()

    def pad_config(self, cfg, model):
        return padnet.PadConfig(target_types=["ffn"], num_experts=4, top_k=2, dynamic_ratio=1.0, seed=cfg.seed)

    def forward(self, model, inputs):
        type(self).calls += 1
        if type(self).calls == cfg_fail_step[0]:
            raise RuntimeError("simulated crash")
        return super().forward(model, inputs)


cfg_fail_step = [-1]


@pytest.fixture
def toy_recipe():
    register_recipe(_ToyRecipe, overwrite=True)
    _ToyRecipe.calls = 0
    cfg_fail_step[0] = -1
    yield _ToyRecipe
    unregister_recipe("toy-dict")


def test_generic_loop_dict_inputs_aux_loss_warmup_partition(toy_recipe, tmp_path):
    cfg = resolve_config({"recipe": "toy-dict", "variant": "pad", "ratio": 0.25, "output_dir": str(tmp_path / "r"),
                          "quiet": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = train(cfg)
    assert s["partition_step"] == 3 and s["partition"]["num_batches"] == 2
    assert s["dynamic_ratio"] == pytest.approx(0.25, abs=0.02)
    assert list(s["layer_dynamic_ratios"]) == ["ffn"]
    assert s["params_fully_dynamic"]["total"] > s["params"]["total"] > s["params_static"]["total"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(0.0) and rows[0]["temperature"] is None


def test_failed_run_leaves_no_summary_and_resumes(toy_recipe, tmp_path):
    out = tmp_path / "r"
    cfg = resolve_config({"recipe": "toy-dict", "variant": "dynamic", "output_dir": str(out), "quiet": True})
    cfg_fail_step[0] = 5 + 2  # 2nd step of epoch 2 (an epoch: 4 train steps + 1 eval batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    assert (out / "config.json").exists() and (out / "checkpoint.pt").exists()
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="unfinished run"):
        train(resolve_config({"recipe": "toy-dict", "variant": "dynamic", "output_dir": str(out), "quiet": True}))
    from padnet.train import resume_config

    cfg_fail_step[0] = -1
    s = train(resume_config(out, {"quiet": True}), resume=True)
    assert s["complete"] and len(json.loads(json.dumps(s))["config"]) > 10
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------- imagefolder


def test_imagefolder_static_run(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, base in (("cats", 40), ("dogs", 200)):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = (base + torch.randint(0, 40, (20, 20, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(arr.numpy()).save(d / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["train", "--recipe", "imagefolder", "--data-dir", str(tmp_path / "data"), "--variant", "static",
               "--width", "0.125", "--batch-size", "4", "--epochs", "1", "--set", "image_size=16", "--quiet",
               "--output-dir", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_train_samples"] == 16 and s["num_test_samples"] == 8
    assert s["params"]["dynamic"] == 0 and s["params_fully_dynamic"] is None
    assert not (out / "modes.png").exists()
    assert "no modes.png" in (out / "report.md").read_text()
