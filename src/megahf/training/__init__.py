"""Training entry points: recipes (YAML -> dataclass) and pretraining with transformers' Trainer."""

from .recipe import PretrainRecipe, RecipeError, load_recipe
from .pretrain import PretrainResult, pretrain, run_pretrain

__all__ = ["PretrainRecipe", "PretrainResult", "RecipeError", "load_recipe", "pretrain", "run_pretrain"]
