"""Training: a generic loop, recipes, checkpoints and multi-process runs.

.. code-block:: python

    from padnet.train import TrainConfig, train, resolve_config

    cfg = resolve_config({"recipe": "fashion-mnist", "variant": "pad", "ratio": 0.3, "epochs": 1,
                          "max_train_samples": 2000, "output_dir": "runs/try"})
    summary = train(cfg)          # writes config.json, metrics.jsonl, model.safetensors, ..., summary.json

Command line: ``padnet train``, ``padnet evaluate``, ``padnet compare``,
``padnet demo``; see ``docs/training.md``. Recipes:
:mod:`padnet.train.recipes` (interface in :mod:`padnet.train.recipes.base`).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config_file, resolve_config
from .loop import default_output_dir, evaluate_model, resume_config, train
from .recipes import DataBundle, Recipe, get_recipe, list_recipes, register_recipe

__all__ = [
    "TrainConfig",
    "resolve_config",
    "load_config_file",
    "train",
    "resume_config",
    "default_output_dir",
    "evaluate_model",
    "save_checkpoint",
    "load_checkpoint",
    "Recipe",
    "DataBundle",
    "register_recipe",
    "get_recipe",
    "list_recipes",
]
