"""``padnet predict``: labels and probabilities for new images or text rows.

    padnet predict runs/fashion-mnist-pad-r0.3-seed0 shirt.png boot.jpg
    padnet predict runs/my-text-run reviews.csv --text-column review --output predictions.csv

``MODEL`` is a ``padnet train`` run directory or a model file it wrote (the
file carries the class names, the input size and the training configuration,
from which the preprocessing is rebuilt: normalisation and resizing for images,
the tokenizer and ``max_length`` for text). Image inputs are files or
directories (searched recursively); text inputs are ``.csv``/``.tsv``/``.jsonl``
files whose ``--text-column`` is classified row by row.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify new images or CSV text rows with a trained model (labels and probabilities)",
        description="Classify images (files or directories) or the rows of CSV/TSV/JSONL files with a model "
                    "written by `padnet train` (a run directory or its model.safetensors). Prints one line per "
                    "input (input, label, probability) or writes every class probability with --output.",
    )
    p.add_argument("model", metavar="MODEL", help="a padnet train run directory or its model file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files/directories, or .csv/.tsv/.jsonl files")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write predictions with every class probability to FILE (.csv or .jsonl)")
    p.add_argument("--text-column", default=None, help="column holding the text (default: the run's, else 'text')")
    p.add_argument("--encoding", default="utf-8", help="encoding of text input files (default utf-8, strict)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=1, help="print the k most likely labels per input")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


# ----------------------------------------------------------------- the model


class Predictor:
    """A loaded model with the preprocessing of its run; ``predict_*`` return probabilities ``[N, classes]``."""

    def __init__(self, model_or_run: str | Path, device: str = "cpu") -> None:
        from ..io.serialization import load, read_metadata
        from ..train.config import TrainConfig, check_device
        from ..train.outputs import CONFIG, read_json
        from .export import resolve_model_path

        self.device = torch.device(check_device(device) if device != "auto" else "cpu")
        path = resolve_model_path(model_or_run)
        model = load(path)
        meta = dict(read_metadata(path).get("extra") or {})
        cfg_dict = meta.get("train_config")
        if cfg_dict is None and (path.parent / CONFIG).is_file():
            cfg_dict = read_json(path.parent / CONFIG)  # a run from before models carried their config
        self.cfg = TrainConfig.from_dict(cfg_dict) if cfg_dict is not None else None
        self.recipe = None
        if self.cfg is not None:
            from ..train.recipes import get_recipe

            self.recipe = get_recipe(self.cfg.recipe)
            self.recipe.check_config(self.cfg)
        self.input = meta.get("input") or {}
        self.model: nn.Module = model.to(self.device).eval()
        self.classes = meta.get("classes")
        self.is_text = self.input.get("kind") == "tokens" or (
            not hasattr(model, "in_chans") and getattr(getattr(model, "encoder", None), "config", None) is not None)

    def label(self, index: int) -> str:
        return str(self.classes[index]) if self.classes and index < len(self.classes) else str(index)

    @torch.no_grad()
    def _probabilities(self, inputs: Any) -> torch.Tensor:
        from ..train.loop import to_device
        from ..train.recipes import call_model, default_logits

        logits = default_logits(call_model(self.model, to_device(inputs, self.device)))
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("the model produced NaN/inf outputs for these inputs")
        return probs

    # ---------------------------------------------------------------- images
    def image_shape(self) -> tuple[int, int, int]:
        shape = self.input.get("shape") if self.input.get("kind") == "image" else None
        if shape and len(shape) == 3:
            return int(shape[0]), int(shape[1]), int(shape[2])
        raise ValueError("this model carries no image input record (channels, size): predict needs a model "
                         "written by `padnet train` (or a run directory)")

    def load_image(self, path: Path) -> torch.Tensor:
        """uint8 ``[H, W]`` (1 channel) or ``[H, W, 3]``, resized to the run's input size."""
        import numpy as np
        from PIL import Image

        from ..data.errors import DatasetFormatError

        channels, height, width = self.image_shape()
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetFormatError(f"{path}: cannot read image: {exc}") from None
        return torch.from_numpy(arr)

    def predict_images(self, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
        if self.recipe is None:
            raise ValueError("image prediction needs the run's preprocessing: give a run directory or a model "
                             "file written by `padnet train`")
        transform = self.recipe.batch_transform(self.cfg, train=False)
        out = []
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([self.load_image(p) for p in paths[i:i + batch_size]])
            out.append(self._probabilities(transform(batch) if transform is not None else batch))
        return torch.cat(out)

    # ------------------------------------------------------------------ text
    def predict_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        from ..data import TokenizedDataset

        if self.recipe is None or not hasattr(self.recipe, "tokenizer"):
            raise ValueError("text prediction needs the run's tokenizer: give a run directory or a model file "
                             "written by `padnet train` with a text recipe")
        tokenizer = self.recipe.tokenizer(self.cfg)
        max_length = int(self.input.get("seq_len") or self.recipe.opt(self.cfg, "max_length"))
        data = TokenizedDataset(texts, [0] * len(texts), tokenizer, max_length=max_length)
        out = []
        for i in range(0, len(texts), batch_size):
            inputs, _ = data.collate_fn([data[j] for j in range(i, min(i + batch_size, len(texts)))])
            out.append(self._probabilities(inputs))
        return torch.cat(out)

    def default_text_column(self) -> str:
        if self.cfg is not None:
            return str(self.cfg.options.get("text_column") or "text")
        return "text"


# ------------------------------------------------------------------- inputs


def image_files(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (sorted, recursively) in directories."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def text_rows(inputs: list[str], column: str, encoding: str) -> tuple[list[str], list[str]]:
    """``(ids, texts)``: ``FILE:ROW`` and the text of every row of every input file."""
    from ..data.text import read_text_records

    ids, texts = [], []
    for item in inputs:
        p = Path(item)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        rows, present = read_text_records(p, encoding)
        if column not in present:
            raise ValueError(f"{p}: no column {column!r}; columns present: {present} (choose one with --text-column)")
        for i, row in enumerate(rows, 1):
            value = row.get(column)
            if value is None:
                raise ValueError(f"{p}: row {i} has no value for {column!r}")
            ids.append(f"{p}:{i}")
            texts.append(str(value))
    if not texts:
        raise ValueError("no text rows to classify")
    return ids, texts


def _is_text_file(name: str) -> bool:
    suffixes = [s.lower() for s in Path(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in TEXT_EXTENSIONS


# ---------------------------------------------------------------------- verb


def predict(model: str | Path, inputs: list[str], *, text_column: str | None = None, encoding: str = "utf-8",
            batch_size: int = 64, device: str = "cpu") -> tuple[list[str], torch.Tensor, list[str]]:
    """``(input ids, probabilities [N, classes], class labels)`` for image files or text rows."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    predictor = Predictor(model, device)
    kinds = {_is_text_file(i) for i in inputs}
    if len(kinds) > 1:
        raise ValueError("give either images or text files (.csv/.tsv/.jsonl), not both")
    if kinds == {True}:
        if not predictor.is_text:
            raise ValueError("text files given, but this is an image model")
        ids, texts = text_rows(inputs, text_column or predictor.default_text_column(), encoding)
        probs = predictor.predict_texts(texts, batch_size)
    else:
        if predictor.is_text:
            raise ValueError("this is a text model: give .csv/.tsv/.jsonl files of texts")
        files = image_files(inputs)
        ids = [str(f) for f in files]
        probs = predictor.predict_images(files, batch_size)
    labels = [predictor.label(i) for i in range(probs.shape[-1])]
    return ids, probs, labels


def write_predictions(path: str | Path, ids: list[str], probs: torch.Tensor, labels: list[str]) -> None:
    """``.csv`` (input, label, probability, one column per class) or ``.jsonl`` (one object per input)."""
    from ..train.outputs import write_text

    path = Path(path)
    best = probs.argmax(dim=-1).tolist()
    if path.suffix.lower() == ".jsonl":
        lines = [json.dumps({"input": i, "label": labels[b], "probability": float(p[b]),
                             "probabilities": {labels[k]: float(v) for k, v in enumerate(p.tolist())}})
                 for i, b, p in zip(ids, best, probs)]
        text = "\n".join(lines) + "\n"
    elif path.suffix.lower() in (".csv", ".tsv"):
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        writer.writerow(["input", "label", "probability", *[f"p_{label}" for label in labels]])
        for i, b, p in zip(ids, best, probs):
            writer.writerow([i, labels[b], f"{float(p[b]):.6f}", *[f"{float(v):.6f}" for v in p]])
        text = buf.getvalue()
    else:
        raise ValueError(f"--output {path}: use a .csv, .tsv or .jsonl file name")
    write_text(path, text)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"--output {args.output}: use a .csv, .tsv or .jsonl file name")
    ids, probs, labels = predict(args.model, args.inputs, text_column=args.text_column, encoding=args.encoding,
                                 batch_size=args.batch_size, device=args.device)
    if args.output:
        write_predictions(args.output, ids, probs, labels)
        print(f"wrote {len(ids)} prediction(s) to {args.output}")
        return 0
    k = min(args.top_k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    for i, v, idx in zip(ids, values.tolist(), indices.tolist()):
        print(i + "\t" + "\t".join(f"{labels[j]}\t{p:.4f}" for j, p in zip(idx, v)))
    sys.stdout.flush()
    return 0
