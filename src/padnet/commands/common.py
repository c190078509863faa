"""Arguments and helpers shared by several CLI verbs."""

from __future__ import annotations

import argparse

from torch import nn

from ..models import create_model, list_models, width_argument
from ..transforms.config import DynamicConvConfig, PadConfig
from ..transforms.dynamize import dynamize_
from ..transforms.partition import DEFAULT_RATIO, check_ratio, partition_

VARIANTS = ("static", "dynamic", "pad")


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "resnet50") -> None:
    parser.add_argument("--model", default=default_model, choices=list_models(),
                        help="zoo model (vision: resnet*, mobilenet_v2; text: tiny_bert, minilm, bert)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the head (default 1000 for vision models, 2 for text models)")
    parser.add_argument("--in-chans", type=int, default=3, help="vision models: input channels")
    parser.add_argument("--small-input", action="store_true", help="3x3 stem, no max-pool (28-32 px images)")
    parser.add_argument("--width", type=float, default=1.0, help="vision models: channel width multiplier")
    parser.add_argument("--model-path", dest="encoder_path", default=None, metavar="DIR",
                        help="text models: local Hugging Face encoder directory (required for --model bert)")


def is_text_model(name: str) -> bool:
    """True for zoo models built as text classifiers (their factory takes ``num_labels``)."""
    import inspect

    from ..models import MODEL_REGISTRY

    fn = MODEL_REGISTRY.get(name)
    return fn is not None and "num_labels" in inspect.signature(fn).parameters


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="pad", choices=VARIANTS)
    parser.add_argument("--ratio", type=float, default=None, help="dynamic ratio kappa in (0, 1] (pad only)")
    parser.add_argument("--num-kernels", type=int, default=4, help="K: kernels per dynamic conv")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def zoo_model(args: argparse.Namespace) -> nn.Module:
    """The zoo model of ``--model`` with the arguments that fit its family (vision or text)."""
    num_classes = getattr(args, "num_classes", None)
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
    if is_text_model(args.model):
        kwargs: dict = {"num_labels": 2 if num_classes is None else num_classes}
        encoder_path = getattr(args, "encoder_path", None)
        if encoder_path is not None:
            kwargs["model_path"] = encoder_path
        elif args.model == "bert":
            raise ValueError("--model bert needs --model-path DIR (a local Hugging Face BERT-style checkpoint)")
        return create_model(args.model, **kwargs)
    if getattr(args, "encoder_path", None) is not None:
        raise ValueError(f"--model-path is for text models; {args.model!r} is a vision model")
    kwargs = {"num_classes": 1000 if num_classes is None else num_classes, "in_chans": args.in_chans,
              "small_input": args.small_input}
    kwargs[width_argument(args.model)] = args.width
    return create_model(args.model, **kwargs)


def text_vocab_size(model: nn.Module) -> int | None:
    """Vocabulary size of a text model (its encoder config, else its first embedding table)."""
    for m in (model, getattr(model, "encoder", None)):
        vocab = getattr(getattr(m, "config", None), "vocab_size", None)
        if vocab is not None:
            return int(vocab)
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if emb is None else int(emb.num_embeddings)


def random_inputs(model: nn.Module, batch: int, *, in_chans: int = 3, image_size: int = 32, seq_len: int = 16,
                  generator=None):
    """Random model inputs: token ids ``[batch, seq_len]`` for a text model, else images ``[batch, C, S, S]``."""
    import torch

    vocab = text_vocab_size(model) if not hasattr(model, "in_chans") else None
    if vocab is not None:
        return torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return torch.randn(batch, in_chans, image_size, image_size, generator=generator)


def resolve_ratio(variant: str, ratio: float | None, default: float = DEFAULT_RATIO) -> float | None:
    """kappa for the variant: required range for pad, refused for static/dynamic."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant != "pad":
        if ratio is not None and ratio != 1.0:
            raise ValueError(f"--ratio is only meaningful with --variant pad (got variant {variant!r})")
        return None
    return check_ratio(default if ratio is None else ratio, "ratio")


def magnitude_partition_(model: nn.Module, ratio: float) -> None:
    """Data-free mode partition for size accounting (global magnitude criterion)."""
    partition_(model, None, None, ratio=ratio, criterion="magnitude", iterations=1)


def make_variant(model: nn.Module, variant: str, ratio: float | None, num_kernels: int = 4) -> nn.Module:
    """Static model as is; dynamic = dynamize_; pad = dynamize_ + data-free partition at ``ratio``."""
    if variant == "static":
        return model
    dynamize_(model, PadConfig(conv=DynamicConvConfig(num_kernels=num_kernels), seed=0))
    if variant == "pad":
        magnitude_partition_(model, ratio)
    return model
