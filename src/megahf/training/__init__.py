"""Training entry points: pretraining with transformers' Trainer, from a recipe (`megahf.recipe`).

    setup.py      recipe -> model config, layout, tokenizer, model (and the checks that need them); load_recipe
    pretrain.py   run_pretrain, step by step
    finetune.py   run_finetune (GLUE, RACE; full, LoRA, QLoRA, 8-bit AdamW), step by step; imported on its own
                  (`from megahf.training.finetune import run_finetune`): it needs the data, peft and bitsandbytes;
                  over finetune_setup.py (model source, tokenizer, data, steps), finetune_model.py (task heads,
                  LoRA/QLoRA), finetune_trainer.py (train and evaluate), finetune_outputs.py (what a run writes)
    trainer.py    MegatronTrainer and its TrainingArguments
    families.py   what differs between GPT and BERT (validation, sample)
    checkpoint.py, resume.py   resumable checkpoints; safe_checkpoint_reader.py reads them without running code
    callbacks.py, log.py, flops.py, outputs.py, processes.py
"""

from ..recipe import PretrainRecipe, RecipeError
from .pretrain import PretrainResult, pretrain, run_pretrain
from .setup import load_recipe

__all__ = ["PretrainRecipe", "PretrainResult", "RecipeError", "load_recipe", "pretrain", "run_pretrain"]
