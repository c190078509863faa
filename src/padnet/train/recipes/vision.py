"""Image-classification recipes: ``fashion-mnist``, ``cifar10``, ``imagefolder``.

Zoo models (``--model``, ``--width``) trained with SGD + Nesterov momentum, a
per-step cosine schedule, weight decay on conv/linear weights only, optional
label smoothing, and light augmentation (random crop with zero padding +
horizontal flip) applied batched on the device. Datasets return uint8 images;
conversion to float, augmentation and normalisation happen in
:meth:`VisionRecipe.batch_transform` on whole batches (much faster than
per-image transforms on a 2-core CPU).

Default model for Fashion-MNIST: ResNet-10 (one BasicBlock per stage) with the
small-input stem (3x3/1, no max-pool) at width 0.5 (stages 32/64/128/256). The
team measured one Fashion-MNIST epoch on 2 CPU cores at ~34 min for a static
ResNet-18 small-input, ~16 min for ResNet-10 and ~3.5 min for ResNet-10 at
width 0.5, which still reaches >= 92% test accuracy in 10 epochs. Dynamic and
PAD variants cost about K+1 = 5 times the static convolution work per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from ...data import transforms as T
from ...data.errors import DatasetNotFoundError
from .base import DataBundle, Recipe, register_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VISION_DEFAULTS: dict[str, Any] = {
    "model": "resnet10",
    "width": 0.5,
    "epochs": 10,
    "batch_size": 128,
    "lr": 0.1,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "label_smoothing": 0.0,
    "lr_schedule": "cosine",
    "warmup_steps": 0,
    # official router init with a BatchNorm on its hidden units, 30 -> 2 over the first 3 epochs (at most half
    # the run): every layer's routing becomes input-dependent (5.3-23x the routing spread of the earlier defaults
    # in each layer) at no accuracy cost; without the norm the early layers barely route, and annealing to 1
    # collapsed routing and cost 10-17 points in the 2-epoch measurement (docs/training.md)
    "temperature_start": 30.0,
    "temperature_end": 2.0,
    "temperature_anneal_fraction": None,
    "temperature_epochs": 3.0,
    "partition_warmup_steps": 0,
    # trained from scratch: independent He fan-out kernels and the official router init (docs/core.md)
    "pad_config": {"init": "fresh", "router_init": "official", "router_norm": "batch"},
}


class BatchImageTransform:
    """uint8 batch ``[B, H, W]`` / ``[B, H, W, C]`` -> normalised float ``[B, C, H, W]``, with optional augmentation."""

    def __init__(self, mean, std, size: tuple[int, int] | None, crop_padding: int = 0, flip: bool = False) -> None:
        self.to_float = T.ToFloat()
        self.augment: list[Callable[[Tensor], Tensor]] = []
        if crop_padding and size is not None:
            self.augment.append(T.RandomCrop(size, padding=int(crop_padding)))
        if flip:
            self.augment.append(T.RandomHorizontalFlip(0.5))
        self.normalize = T.Normalize(mean, std)

    def __call__(self, x: Tensor) -> Tensor:
        if not x.is_floating_point() or x.ndim != 4 or x.shape[1] not in (1, 3):
            if x.ndim == 3:  # grayscale batch [B, H, W]
                x = x.unsqueeze(-1)
            x = self.to_float(x)
        for t in self.augment:
            x = t(x)
        return self.normalize(x)

    def __repr__(self) -> str:
        return f"BatchImageTransform(augment={self.augment}, {self.normalize})"


class VisionRecipe(Recipe):
    """Shared logic of the image recipes; subclasses provide the datasets and statistics."""

    defaults = dict(VISION_DEFAULTS)
    options: dict[str, Any] = {"crop_padding": 2, "flip": True, "small_input": True}
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3

    def __init__(self) -> None:
        self._cache: tuple[Any, DataBundle] | None = None

    def image_size(self, cfg) -> tuple[int, int] | None:
        return None

    def _load(self, cfg) -> DataBundle:
        raise NotImplementedError

    def build_data(self, cfg) -> DataBundle:
        key = (cfg.data_dir, tuple(sorted((k, repr(v)) for k, v in cfg.options.items())))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._load(cfg))
        return self._cache[1]

    def validate(self, cfg) -> None:
        self.build_data(cfg)  # raises DatasetNotFoundError with instructions; cached for the run

    def check_config(self, cfg) -> None:
        from ...models import list_models

        if cfg.model not in list_models():
            raise ValueError(f"unknown model {cfg.model!r} for recipe {self.name!r}; known models: "
                             f"{', '.join(list_models())}")
        from ..config import parse_bool

        for key in ("flip", "small_input"):
            if cfg.options.get(key) is not None:  # imagefolder: small_input None = decide by image size
                cfg.options[key] = parse_bool(cfg.options[key], f"option {key}")
        padding = cfg.options.get("crop_padding", 0)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"option crop_padding must be an integer >= 0, got {padding!r}")

    def build_model(self, cfg, data: DataBundle) -> nn.Module:
        from ...models import create_model, width_argument

        kwargs: dict[str, Any] = {
            "num_classes": int(data.num_classes),
            "in_chans": self.in_chans,
            "small_input": bool(cfg.options.get("small_input", True)),
        }
        width = 1.0 if cfg.width is None else float(cfg.width)
        kwargs[width_argument(cfg.model)] = width
        return create_model(cfg.model, **kwargs)

    def batch_transform(self, cfg, train: bool) -> Callable[[Tensor], Tensor]:
        augment = train and cfg.augment
        return BatchImageTransform(
            self.mean, self.std, self.image_size(cfg),
            crop_padding=int(cfg.options.get("crop_padding", 0)) if augment else 0,
            flip=bool(cfg.options.get("flip", False)) if augment else False,
        )


@register_recipe
class FashionMNISTRecipe(VisionRecipe):
    """Fashion-MNIST (28x28 grayscale, 10 classes), offline from the idx files."""

    name = "fashion-mnist"
    description = ("Fashion-MNIST 28x28 grayscale, 10 classes (default data: /usr/share/datasets/fashion-mnist); "
                   "ResNet-10 small-input width 0.5")
    # batch 64: twice the optimizer steps of 128 at about the same cost per image on a CPU; short
    # runs (1 epoch on a 2,000-image subset) then already reach 65-70% test accuracy.
    defaults = {**VISION_DEFAULTS, "batch_size": 64}
    options = {"crop_padding": 2, "flip": True, "small_input": True}
    in_chans = 1

    @property
    def mean(self):  # type: ignore[override]
        from ...data import FASHION_MNIST_MEAN

        return FASHION_MNIST_MEAN

    @property
    def std(self):  # type: ignore[override]
        from ...data import FASHION_MNIST_STD

        return FASHION_MNIST_STD

    def image_size(self, cfg) -> tuple[int, int]:
        return (28, 28)

    def _load(self, cfg) -> DataBundle:
        from ...data import FashionMNIST

        train = FashionMNIST(cfg.data_dir, train=True)
        test = FashionMNIST(cfg.data_dir, train=False)
        return DataBundle(train, test, None, num_classes=len(FashionMNIST.classes),
                          info={"classes": list(FashionMNIST.classes), "root": str(train.root)})


@register_recipe
class CIFAR10Recipe(VisionRecipe):
    """CIFAR-10 (32x32 RGB, 10 classes) from the python-pickle release; ``--data-dir`` required."""

    name = "cifar10"
    description = "CIFAR-10 32x32 RGB, 10 classes (--data-dir: extracted cifar-10-batches-py); ResNet-18 small-input"
    defaults = {**VISION_DEFAULTS, "model": "resnet18", "width": 1.0, "epochs": 30}
    options = {"crop_padding": 4, "flip": True, "small_input": True}

    @property
    def mean(self):  # type: ignore[override]
        from ...data import CIFAR10_MEAN

        return CIFAR10_MEAN

    @property
    def std(self):  # type: ignore[override]
        from ...data import CIFAR10_STD

        return CIFAR10_STD

    def image_size(self, cfg) -> tuple[int, int]:
        return (32, 32)

    def _load(self, cfg) -> DataBundle:
        from ...data import CIFAR10

        if cfg.data_dir is None:
            raise DatasetNotFoundError(
                "recipe cifar10 needs --data-dir DIR: the extracted python release (cifar-10-batches-py) or its "
                "parent. Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on a "
                "machine with network access and extract it (padnet never downloads)."
            )
        train = CIFAR10(cfg.data_dir, train=True)
        test = CIFAR10(cfg.data_dir, train=False)
        return DataBundle(train, test, None, num_classes=10, info={"classes": list(train.classes)})


@register_recipe
class ImageFolderRecipe(VisionRecipe):
    """Any ``DIR/train/<class>/*.jpg`` + ``DIR/{val,test}/<class>/*.jpg`` tree, resized to ``image_size``."""

    name = "imagefolder"
    description = ("images in --data-dir/train/<class>/ and --data-dir/{val,test}/<class>/, resized to "
                   "options.image_size (default 64); ResNet-18")
    defaults = {**VISION_DEFAULTS, "model": "resnet18", "width": 1.0, "epochs": 30, "batch_size": 64}
    options = {"crop_padding": 4, "flip": True, "small_input": None, "image_size": 64}

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        size = cfg.options.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"option image_size must be an integer >= 8, got {size!r}")

    def image_size(self, cfg) -> tuple[int, int]:
        size = int(cfg.options.get("image_size", 64))
        return (size, size)

    def build_model(self, cfg, data: DataBundle) -> nn.Module:
        if cfg.options.get("small_input") is None:
            cfg = _with_options(cfg, small_input=self.image_size(cfg)[0] <= 64)
        return super().build_model(cfg, data)

    def _load(self, cfg) -> DataBundle:
        from ...data import ImageFolder

        if cfg.data_dir is None:
            raise DatasetNotFoundError(
                "recipe imagefolder needs --data-dir DIR holding train/<class>/<images> and val/<class>/<images> "
                "(or test/<class>/<images>)"
            )
        root = Path(cfg.data_dir)
        if not (root / "train").is_dir():
            raise DatasetNotFoundError(f"{root}/train not found: recipe imagefolder expects DIR/train/<class>/<images> "
                                       "and DIR/val/<class>/<images> (or DIR/test/...)")
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DatasetNotFoundError(f"neither {root}/val nor {root}/test found: recipe imagefolder needs a "
                                       "held-out split DIR/val/<class>/<images> (or DIR/test/...)")
        size = self.image_size(cfg)[0]
        train = ImageFolder(root / "train", image_size=size)
        test = ImageFolder(test_dir, image_size=size)
        if test.classes != train.classes:
            raise ValueError(f"class folders differ between {root / 'train'} ({train.classes}) and "
                             f"{test_dir} ({test.classes})")
        return DataBundle(train, test, None, num_classes=len(train.classes), info={"classes": list(train.classes)})


def _with_options(cfg, **options):
    import copy

    cfg = copy.copy(cfg)
    cfg.options = {**cfg.options, **options}
    return cfg

