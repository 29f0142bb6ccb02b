"""Recipes: flat YAML files parsed into a few small dataclasses, one per concern, shared by every verb.

    model.py      ModelRecipe      the preset and its config overrides
    data.py       DataRecipe       corpus or Megatron indexed data, tokenizer, sample shape
    parallel.py   ParallelRecipe   tensor parallel x FSDP x replicas, micro and global batch
    optimizer.py  OptimizerRecipe  AdamW, warmup and decay, clipping, train_steps
    run.py        RunRecipe        seed, evaluation, logging, sample, outputs, checkpoints and resume
    hub.py        HubRecipe        push_to_hub, hub_model_id, hub_private, hub_revision: publish at the end
    verbs.py      PretrainRecipe   the sections `megahf pretrain` reads
    finetune.py   FinetuneRecipe   `megahf finetune`: task, parallel, optim (+ 8-bit), peft (LoRA/QLoRA), run
    evaluate.py   LambadaRecipe, WikiTextRecipe   the one flat section each of `megahf evaluate lambada|wikitext`
    parsing.py    flat keys and `--key value` overrides -> sections, with the checks of each

Nothing here imports torch or transformers (`megahf <verb> --help` reads it); building a config or a layout from a
recipe, and the checks that need one, are `megahf.training.setup`'s.
"""

from .data import DataRecipe
from .errors import RecipeError
from .finetune import FinetuneRecipe
from .hub import HubRecipe
from .model import ModelRecipe
from .optimizer import OptimizerRecipe
from .parallel import ParallelRecipe
from .parsing import parse_overrides, parse_recipe, recipe_help, recipe_keys, save_recipe
from .run import RunRecipe
from .verbs import PretrainRecipe

__all__ = ["DataRecipe", "FinetuneRecipe", "HubRecipe", "ModelRecipe", "OptimizerRecipe", "ParallelRecipe",
           "PretrainRecipe", "RecipeError", "RunRecipe", "parse_overrides", "parse_recipe", "recipe_help", "recipe_keys", "save_recipe"]
