"""The ``Recipe`` interface and the recipe registry.

A recipe is everything task-specific about a training run; the generic loop in
:mod:`padnet.train.loop` does the rest (variants, partition, temperature
annealing, distributed training, checkpoints, outputs). To add a task:

.. code-block:: python

    from padnet.train.recipes.base import DataBundle, Recipe, register_recipe

    @register_recipe
    class MyRecipe(Recipe):
        name = "my-task"
        description = "one line for `padnet train --list-recipes`"
        defaults = {"epochs": 3, "lr": 5e-5, "optimizer": "adamw", ...}   # TrainConfig fields
        options = {"max_length": 128}                                       # recipe-only settings

        def build_data(self, cfg):            # -> DataBundle
            ...
        def build_model(self, cfg, data):     # -> static nn.Module (before dynamize_)
            ...

Everything else has a working default that may be overridden. The loop calls,
in this order (``cfg`` is the resolved :class:`~padnet.train.config.TrainConfig`,
recipe-only settings in ``cfg.options``):

1. ``check_config(cfg)``: cheap checks at resolve time (no data loading).
2. ``validate(cfg)``: before anything is written (e.g. the dataset exists);
   defaults to nothing. Raise ``ValueError`` / ``FileNotFoundError`` (incl.
   :class:`padnet.data.DatasetNotFoundError`) with a message telling the user
   what to do; the CLI prints it and exits with status 2.
3. ``build_data(cfg) -> DataBundle``: train/test datasets (items
   ``(inputs, target)``), the ``collate_fn`` making ``(inputs, targets)``
   batches, ``num_classes``. ``inputs`` may be a tensor (``model(x)``), a dict
   (``model(**x)``) or a tuple (``model(*x)``). The loop subsets them
   (``--max-train-samples``/``--max-test-samples``) and builds the samplers.
4. ``build_model(cfg, data) -> nn.Module``: the static model.
5. for ``dynamic``/``pad``: ``dynamize(cfg, model)`` (default
   ``padnet.dynamize_(model, self.pad_config(cfg, model))``). Override to
   break symmetry etc. ``pad_config`` defaults to
   ``PadConfig(conv=DynamicConvConfig(num_kernels=cfg.num_kernels,
   temperature=cfg.temperature_start), seed=cfg.seed).updated(cfg.pad_config)``.
6. ``build_optimizer(cfg, model)`` (default: SGD / AdamW / Adam from
   ``cfg.optimizer`` over :meth:`param_groups`, i.e. no weight decay on
   biases, norms and PAD scale factors: every parameter with ``ndim <= 1``)
   and ``build_scheduler(cfg, optimizer, total_steps)`` (default: per-step
   ``LambdaLR``: linear warm-up over ``cfg.warmup_steps`` then
   ``cfg.lr_schedule`` = cosine / linear / constant down to ``cfg.min_lr``).
   The scheduler is stepped after **every optimizer step**.
7. ``loss(cfg) -> loss_fn(outputs, targets) -> scalar`` (default:
   cross-entropy with ``cfg.label_smoothing`` on :meth:`logits` of the
   outputs). The same ``loss_fn`` is handed to ``padnet.transforms.partition.partition_``.
8. every step: ``batch_transform(cfg, train=True)`` (applied to the inputs
   *after* they are moved to the device: batched augmentation and
   normalisation; ``None`` for none), ``forward(model, inputs)``,
   ``loss_fn(outputs, targets) + aux_loss(cfg, model)`` (default:
   ``padnet.layers.moe.collect_aux_loss`` when ``cfg.aux_loss`` and the model
   has MoE layers, else nothing), ``accuracy`` from :meth:`logits` (argmax
   over the last axis).
9. ``example_input(cfg, data)``: one small batch of inputs for
   ``padnet.count_flops`` (default: two test items, collated and
   transformed).
10. ``load_model(cfg, data, path)``: rebuild a saved model for ``padnet
    evaluate`` (default ``padnet.load(path, model=self.build_model(cfg, data))``).

Partition timing is a setting, not code: ``partition_warmup_steps = 0`` (the
vision recipes) partitions before the first step; ``N > 0`` trains N optimizer
steps fully dynamic, then partitions (on ``cfg.partition_batches`` training
batches, no augmentation) and goes on (use it when the dynamic factors start
symmetric, e.g. MoE experts upcycled from one dense FFN).
"""

from __future__ import annotations

import collections.abc
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...registry import Registry

__all__ = [
    "DataBundle",
    "Recipe",
    "register_recipe",
    "unregister_recipe",
    "get_recipe",
    "list_recipes",
    "call_model",
    "default_logits",
]


@dataclass
class DataBundle:
    """What :meth:`Recipe.build_data` returns.

    Attributes:
        train, test: map-style datasets; an item is ``(inputs, target)``.
        collate_fn: batches a list of items into ``(inputs, targets)``
            (``None``: torch's default collate).
        num_classes: number of classes (``None`` if not a classification task).
        info: free-form facts for the report (class names, tokenizer, ...).
    """

    train: Dataset
    test: Dataset
    collate_fn: Callable | None = None
    num_classes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, collections.abc.Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def default_logits(outputs: Any) -> Tensor:
    """Logits of a model output: a tensor, an object with ``.logits`` (Hugging Face), a dict or a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, collections.abc.Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in model output of type {type(outputs).__name__}")


class Recipe:
    """Base class of training recipes (see the module docstring for the call order).

    Class attributes:
        name: registry key (``--recipe NAME``).
        description: one line shown by ``padnet train --list-recipes``.
        defaults: :class:`~padnet.train.config.TrainConfig` field values of this
            recipe (override the dataclass defaults; overridden by a config file
            and by flags), e.g. ``epochs``, ``batch_size``, ``lr``, ``optimizer``,
            ``weight_decay``, ``label_smoothing``, ``lr_schedule``, ``warmup_steps``,
            ``temperature_start``/``_end``/``_epochs``, ``partition_warmup_steps``,
            ``model``, ``width``, ``find_unused_parameters``.
        options: recipe-only settings and their defaults; resolved values land in
            ``cfg.options`` (set them in a config file, or ``--set KEY=VALUE``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    options: ClassVar[dict[str, Any]] = {}

    # --------------------------------------------------------------- checks
    def check_config(self, cfg) -> None:
        """Cheap consistency checks of a resolved config (no I/O). Default: none."""

    def validate(self, cfg) -> None:
        """Checks before a run writes anything (e.g. that the dataset exists). Default: none."""

    # ----------------------------------------------------------------- data
    def build_data(self, cfg) -> DataBundle:
        raise NotImplementedError(f"recipe {self.name!r} does not implement build_data")

    def batch_transform(self, cfg, train: bool) -> Callable[[Any], Any] | None:
        """Function applied to each batch's inputs on the device (augmentation, normalisation)."""
        return None

    def example_input(self, cfg, data: DataBundle) -> Any:
        """A two-sample input batch for FLOP counting (already transformed, on CPU)."""
        n = min(2, len(data.test))
        if n == 0:
            raise ValueError("the test set is empty")
        items = [data.test[i] for i in range(n)]
        collate = data.collate_fn or torch.utils.data.default_collate
        inputs, _ = collate(items)
        transform = self.batch_transform(cfg, train=False)
        return transform(inputs) if transform is not None else inputs

    def input_spec(self, cfg, data: DataBundle) -> dict[str, Any]:
        """What one model input looks like, saved with the model (exports and ``padnet predict`` read it).

        Default, from :meth:`example_input`: a tensor gives ``{"kind": "image" | "tensor",
        "shape": per-sample shape, "dtype"}``; a mapping with ``input_ids`` gives ``{"kind":
        "tokens", "seq_len": ...}``.
        """
        example = self.example_input(cfg, data)
        if isinstance(example, Tensor):
            kind = "image" if example.ndim == 4 else "tensor"
            return {"kind": kind, "shape": [int(d) for d in example.shape[1:]], "dtype": str(example.dtype)}
        if isinstance(example, collections.abc.Mapping) and "input_ids" in example:
            return {"kind": "tokens", "seq_len": int(example["input_ids"].shape[-1])}
        return {"kind": type(example).__name__}

    def class_names(self, cfg, data: DataBundle) -> list[str] | None:
        """Names of the output indices (``class_names[i]`` is class ``i``), if the data knows them."""
        names = data.info.get("classes") or data.info.get("label_names")
        return [str(n) for n in names] if names else None

    # ---------------------------------------------------------------- model
    def build_model(self, cfg, data: DataBundle) -> nn.Module:
        raise NotImplementedError(f"recipe {self.name!r} does not implement build_model")

    def pad_config(self, cfg, model: nn.Module):
        """The :class:`padnet.PadConfig` for ``dynamic`` / ``pad`` variants."""
        from ...transforms.config import DynamicConvConfig, PadConfig

        base = PadConfig(conv=DynamicConvConfig(num_kernels=cfg.num_kernels, temperature=cfg.temperature_start),
                         seed=cfg.seed)
        return base.updated(cfg.pad_config)

    def dynamize(self, cfg, model: nn.Module) -> nn.Module:
        """Make ``model`` dynamic in place (masks all dynamic); partition comes later."""
        from ...transforms.dynamize import dynamize_

        return dynamize_(model, self.pad_config(cfg, model))

    def load_model(self, cfg, data: DataBundle, path) -> nn.Module:
        """Rebuild the saved model of a run (``model.safetensors``) for evaluation."""
        from ...io.serialization import load

        return load(path, model=self.build_model(cfg, data))

    # ------------------------------------------------------------ optimizer
    def param_groups(self, cfg, model: nn.Module) -> list[dict[str, Any]]:
        """Weight decay on weights with ``ndim >= 2``; none on biases, norms, scales."""
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def build_optimizer(self, cfg, model: nn.Module) -> torch.optim.Optimizer:
        groups = self.param_groups(cfg, model)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=bool(cfg.nesterov and cfg.momentum > 0))
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")

    def build_scheduler(self, cfg, optimizer: torch.optim.Optimizer, total_steps: int):
        """Per-step schedule: linear warm-up, then cosine / linear / constant to ``min_lr``."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lr_factor_fn(cfg.lr_schedule, total_steps, cfg.warmup_steps, cfg.min_lr / cfg.lr)
        )

    # ------------------------------------------------------------------ loss
    def logits(self, outputs: Any) -> Tensor:
        return default_logits(outputs)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        return call_model(model, inputs)

    def loss(self, cfg) -> Callable[[Any, Any], Tensor]:
        smoothing = float(cfg.label_smoothing)
        logits = self.logits

        def loss_fn(outputs: Any, targets: Tensor) -> Tensor:
            return F.cross_entropy(logits(outputs), targets, label_smoothing=smoothing)

        return loss_fn

    def aux_loss(self, cfg, model: nn.Module) -> Tensor | None:
        """Extra loss added to the task loss each step (MoE load balancing by default)."""
        if not cfg.aux_loss or not _has_moe(model):
            return None
        from ...layers.moe import collect_aux_loss

        return collect_aux_loss(model)

    def accuracy_counts(self, outputs: Any, targets: Tensor) -> tuple[int, int]:
        """``(correct, count)`` of a batch."""
        pred = self.logits(outputs).argmax(dim=-1)
        return int((pred == targets).sum()), int(targets.numel())

    def __repr__(self) -> str:
        return f"<recipe {self.name!r}>"


def _has_moe(model: nn.Module) -> bool:
    from ...layers.moe import CompactMoEFeedForward, MoEFeedForward

    return any(isinstance(m, (MoEFeedForward, CompactMoEFeedForward)) for m in model.modules())


def lr_factor_fn(schedule: str, total_steps: int, warmup_steps: int, min_factor: float) -> Callable[[int], float]:
    """``step -> lr / base_lr``: linear warm-up over ``warmup_steps``, then the schedule to ``min_factor``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    min_factor = float(min_factor)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if schedule == "cosine":
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return min_factor + (1.0 - min_factor) * (1.0 - progress)
        raise ValueError(f"unknown lr schedule {schedule!r}")

    return factor


# ------------------------------------------------------------------ registry

def _check_recipe(name: str, cls: type[Recipe]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise TypeError(f"register_recipe expects a Recipe subclass, got {cls!r}")


RECIPES: Registry[type[Recipe]] = Registry("recipe", check=_check_recipe)


def register_recipe(cls: type[Recipe] | None = None, *, overwrite: bool = False):
    """Register a :class:`Recipe` subclass under ``cls.name`` (usable as a class decorator)."""

    def _add(c: type[Recipe]) -> type[Recipe]:
        _check_recipe(getattr(c, "name", "?"), c)
        if not c.name:
            raise ValueError(f"recipe class {c.__name__} has no name")
        return RECIPES.register(c.name, c, overwrite=overwrite)

    return _add if cls is None else _add(cls)


def unregister_recipe(name: str) -> None:
    """Remove a registered recipe (``KeyError`` listing the registered ones if absent)."""
    RECIPES.unregister(name)


def list_recipes() -> list[str]:
    """Sorted names of the registered recipes."""
    _load_builtin()
    return RECIPES.names()


def get_recipe(name: str | Recipe) -> Recipe:
    """A fresh instance of the recipe ``name``; unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(name, Recipe):
        return name
    _load_builtin()
    return RECIPES.get(name)()


# Modules holding built-in recipes; each registers its recipes on import (lazily: they import this one).
BUILTIN_MODULES = ("padnet.train.recipes.vision", "padnet.train.recipes.text")
_loaded = False


def _load_builtin() -> None:
    """Import the built-in recipe modules once (a module that does not exist is skipped)."""
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    _loaded = True
