"""Model zoo: torchvision-compatible ResNets and MobileNetV2, plus a name registry."""

from .mobilenetv2 import InvertedResidual, MobileNetV2, mobilenet_v2
from .registry import MODEL_REGISTRY, create_model, list_models, register_model, unregister_model
from .spec import record_spec, records_spec, width_argument
from .resnet import BasicBlock, Bottleneck, ResNet, resnet10, resnet18, resnet34, resnet50

# Text models register "minilm", "tiny_bert" and "bert" (transformers is imported lazily).
from .bert import BertClassifier, bert_classifier, minilm_classifier, tiny_bert_classifier  # noqa: E402

# Structural FFN blocks of other transformer families (DistilBERT, ViT, GPT-2, T5, LLaMA, ...): "hf_ffn".
from .hf_ffn import FFNMapping, register_ffn_mapping, unregister_ffn_mapping  # noqa: E402

__all__ = [
    "MODEL_REGISTRY",
    "create_model",
    "list_models",
    "register_model",
    "unregister_model",
    "record_spec",
    "records_spec",
    "width_argument",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "MobileNetV2",
    "InvertedResidual",
    "BertClassifier",
    "bert_classifier",
    "minilm_classifier",
    "tiny_bert_classifier",
    "FFNMapping",
    "register_ffn_mapping",
    "unregister_ffn_mapping",
]
