"""Offline-capable image and text datasets and tensor transforms.

Nothing here downloads: datasets read local files and raise
:class:`DatasetNotFoundError` with instructions when they are missing.
"""

from padnet.data import transforms
from padnet.data.errors import DatasetFormatError, DatasetNotFoundError
from padnet.data.text import (
    TextSplits,
    TokenizedDataset,
    collate,
    load_movie_sentiment,
    load_text_csv,
)
from padnet.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToFloat,
)
from padnet.data.vision import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    ImageFolder,
    read_idx,
)

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "FashionMNIST",
    "CIFAR10",
    "ImageFolder",
    "read_idx",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_FASHION_MNIST_ROOT",
    "transforms",
    "Compose",
    "ToFloat",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "TextSplits",
    "load_movie_sentiment",
    "load_text_csv",
    "TokenizedDataset",
    "collate",
]
