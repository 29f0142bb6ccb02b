"""What `megahf finetune` checks and decides before anything is computed or written: where the pretrained model
comes from (`resolve_model`) and whether it fits the task and the layout (`check_layout`), the tokenizer, the task's
data (checked by the task), the number of steps (`plan_steps`) and the checkpoint to resume from
(`find_finetune_checkpoint`). Every refusal is a `RecipeError` naming the recipe key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from transformers import AutoConfig, AutoTokenizer

from ..adapter_folder import AdapterFolderError, adapter_base, is_adapter_folder
from ..assets import embedded_tokenizer_path
from ..errors import training_checkpoint_hint
from ..models.bert import MegatronBertConfig
from ..parallel.layout import ParallelLayout
from ..recipe import FinetuneRecipe, RecipeError
from ..recipe.data import EMBEDDED_BERT_TOKENIZER
from ..recipe.finetune import BERT_PRESETS
from ..tasks.finetuning import FinetuneTask, fixture_path
from .log import say
from .resume import GLOBAL_BATCH_REASON, SEED_REASON, resume_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


@dataclass(frozen=True)
class ModelSource:
    """Where the pretrained weights come from: a folder (or Hub id) and its config, or a preset (random weights)."""

    name: str
    config: MegatronBertConfig
    pretrained: bool  # False: a preset, randomly initialised
    has_tokenizer: bool
    adapter_of: str | None = None  # a peft adapter folder: the base model it names, loaded with the adapter merged

    @property
    def weights(self) -> str:
        """What `from_pretrained` loads: the folder or Hub id, or an adapter's base."""
        return self.adapter_of or self.name


def resolve_model(recipe: FinetuneRecipe, task: FinetuneTask) -> ModelSource:
    """Read the model's config (no weights) and refuse a model that cannot do the task."""
    name = recipe.task.model
    if name in BERT_PRESETS:
        say(f"WARNING: model={name!r} is a preset: fine-tuning starts from RANDOM weights, not a pretrained BERT; give "
            "a pretrained folder (e.g. a `megahf pretrain` run's final/) for meaningful results")
        return ModelSource(name, MegatronBertConfig.from_preset(name), pretrained=False, has_tokenizer=False)
    adapter_of = None
    if is_adapter_folder(name):
        try:
            adapter_of, _ = adapter_base(name)
        except AdapterFolderError as error:
            raise RecipeError(f"recipe key model={name!r}: {error}") from None
    hint = training_checkpoint_hint(name)
    if hint:
        raise RecipeError(f"recipe key model={name!r}: {hint}")
    try:
        config = AutoConfig.from_pretrained(adapter_of or name)
    except (OSError, ValueError) as error:
        if adapter_of:
            raise RecipeError(f"recipe key model={name!r} is a peft adapter whose base model {adapter_of!r} cannot "
                              f"be read ({str(error).splitlines()[0]}); set base_model_name_or_path in its "
                              "adapter_config.json to the base's folder or Hub id") from None
        raise RecipeError(f"recipe key model={name!r}: cannot read its config.json "
                          f"({str(error).splitlines()[0]}); give a pretrained model folder") from None
    model_type = getattr(config, "model_type", None)
    if model_type in ("bert", "megatron-bert"):
        raise RecipeError(
            f"recipe key model={name!r} is a transformers {model_type!r} folder: convert it to megahf's BERT first "
            "(megahf.convert.hf_bert.from_transformers(model).save_pretrained(folder)) and give that folder"
        )
    if not isinstance(config, MegatronBertConfig):
        raise RecipeError(
            f"recipe key model={name!r} is a {model_type!r} model ({type(config).__name__}): {task.name} needs a BERT "
            f"encoder with a {task.head.replace('_', '-')} head (MegatronBert, model_type 'megatron_bert'); give a "
            "`megahf pretrain` BERT run's final/ or a converted BERT folder"
        )
    # a folder's own tokenizer if it holds one; a Hub repo's always (the shipped one would silently mismatch it)
    has_tokenizer = (any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES) if os.path.isdir(name)
                     else True)
    return ModelSource(name, config, pretrained=True, has_tokenizer=has_tokenizer, adapter_of=adapter_of)


def check_layout(recipe: FinetuneRecipe, source: ModelSource, layout: ParallelLayout) -> None:
    """The model fits the sequence length and the tensor-parallel size; QLoRA's device is one bitsandbytes has."""
    config, n = source.config, recipe.task.max_seq_length
    if n > config.max_position_embeddings:
        raise RecipeError(
            f"recipe key max_seq_length={n} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings} ({source.name}); lower max_seq_length to at most "
            f"{config.max_position_embeddings}"
        )
    if recipe.optim.optim == "adamw_bnb_8bit" and layout.fsdp_size > 1 and not recipe.parallel.fsdp_size:
        raise RecipeError(  # the recipe's own fsdp_size > 1 is refused with the recipe (FinetuneRecipe.validate)
            f"recipe key optim='adamw_bnb_8bit' under the launch config's distributed_type: FSDP (fsdp_size="
            f"{layout.fsdp_size}): bitsandbytes' 8-bit AdamW has no rule for FSDP2's DTensor shards; use optim: adamw, "
            "or launch with a MULTI_GPU config (DDP)"
        )
    tp = layout.tensor_parallel_size
    try:
        config.check_tensor_parallel(tp)
    except ValueError as error:
        raise RecipeError(f"recipe key tensor_parallel_size={tp} does not fit model={source.name!r}: {error}"
                          .replace("tp_size=", "tensor_parallel_size=")) from None
    if recipe.peft.peft == "qlora" and not source.pretrained:
        raise RecipeError(f"recipe key peft='qlora' quantizes pretrained weights as they load; model={source.name!r} "
                          "is a preset: give a pretrained folder, or peft: lora")
    if recipe.peft.peft == "qlora" and source.adapter_of:
        raise RecipeError(f"recipe key peft='qlora' quantizes pretrained weights as they load from a folder, but "
                          f"model={source.name!r} is a peft adapter merged into its base in memory; save the merged "
                          "model (PeftModel.merge_and_unload().save_pretrained) and give that folder, or peft: lora")


# What a checkpoint's marker must share with the run that resumes it (recipe keys), and why.
FINETUNE_REASONS = {
    "global_batch_size": GLOBAL_BATCH_REASON,
    "seed": SEED_REASON,
    "task": "its task head and data position belong to another task",
    "dataset": "its data position belongs to another data set",
    "smoke": "its data position belongs to another data set",
    "max_seq_length": "its examples were cut at another length",
    "model": "it continues from another pretrained model (a LoRA run takes its frozen base from there)",
    "peft": "it holds the weights of another fine-tuning method",
    "lora_rank": "its adapters have another shape",
    "lora_alpha": "its adapters are scaled otherwise",
    "lora_target_modules": "it adapts other layers",
}


def finetune_checkpoint_metadata(recipe: FinetuneRecipe, layout: ParallelLayout) -> dict:
    """The values a fine-tuning checkpoint's marker holds (FINETUNE_REASONS' keys, the layout, the steps)."""
    peft = recipe.peft
    lora = peft.peft != "none"
    return {"global_batch_size": layout.global_batch_size, "seed": recipe.run.seed, "task": recipe.task.task,
            "dataset": recipe.task.dataset, "smoke": recipe.task.smoke, "max_seq_length": recipe.task.max_seq_length,
            "model": recipe.task.model, "peft": peft.peft, "lora_rank": peft.lora_rank if lora else None,
            "lora_alpha": peft.lora_alpha if lora else None,
            "lora_target_modules": peft.lora_target_modules if lora else None,
            "world_size": layout.world_size, "tensor_parallel_size": layout.tensor_parallel_size,
            "fsdp_size": layout.fsdp_size, "train_steps": recipe.optim.train_steps}


def find_finetune_checkpoint(recipe: FinetuneRecipe, layout: ParallelLayout):
    """The checkpoint a fine-tuning run resumes from (`resume: auto|none|PATH`), refused if it was written for
    another task, data, model, method or batch (collective: rank 0 decides)."""
    return resume_checkpoint(recipe.run, finetune_checkpoint_metadata(recipe, layout), FINETUNE_REASONS)


def load_tokenizer(recipe: FinetuneRecipe, source: ModelSource):
    """The recipe's tokenizer, else the model folder's own, else the shipped BERT WordPiece; it must be a BERT
    tokenizer whose ids fit the model's vocabulary."""
    name = recipe.task.tokenizer or (source.name if source.has_tokenizer else EMBEDDED_BERT_TOKENIZER)
    key = "tokenizer" if recipe.task.tokenizer else "model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_path(name) or name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"recipe key {key}={name!r}: its tokenizer cannot be loaded "
                          f"({str(error).splitlines()[0]}); give a tokenizer folder or "
                          f"'{EMBEDDED_BERT_TOKENIZER}'") from None
    missing = [t for t in ("cls", "sep", "pad") if getattr(tokenizer, f"{t}_token_id") is None]
    if missing:
        raise RecipeError(f"recipe key {key}={name!r}: the tokenizer has no {', '.join(missing)} token; BERT "
                          f"fine-tuning needs [CLS], [SEP] and [PAD] (e.g. '{EMBEDDED_BERT_TOKENIZER}')")
    if len(tokenizer) > source.config.vocab_size:
        raise RecipeError(
            f"recipe key {key}={name!r} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{source.config.vocab_size}: its ids would index past the embeddings; use the tokenizer the model was "
            "pretrained with"
        )
    return tokenizer


def load_data(recipe: FinetuneRecipe, task: FinetuneTask):
    """The task's splits (checked by the task: splits, columns, labels) and the local folder they came from."""
    folder = fixture_path(task.name) if recipe.task.smoke else recipe.task.dataset
    if recipe.task.smoke:
        say(f"smoke run: the {task.name} fixture shipped with megahf ({folder}), NOT the real data set")
    raw = task.load(None if folder is None else str(folder))
    return raw, (None if folder is None else str(folder))


def plan_steps(recipe: FinetuneRecipe, layout: ParallelLayout, train_rows: int) -> FinetuneRecipe:
    """The recipe with train_steps and warmup_steps resolved: Megatron's finetune trains `epochs` passes of
    train_rows // global batch steps (its loader drops the last partial batch), and warms up over
    warmup_fraction of them."""
    optim = recipe.optim
    per_epoch = max(1, train_rows // layout.global_batch_size)
    steps = optim.train_steps or recipe.task.epochs * per_epoch
    if steps == 0:
        say("epochs=0: no training (Megatron's --epochs 0); the model's own task head scores the dev split(s) and "
            "predicts the test split(s)")
        optim = dataclasses.replace(optim, warmup_steps=0, warmup_fraction=0.0)
        return dataclasses.replace(recipe, optim=optim)
    warmup = optim.warmup_steps or int(optim.warmup_fraction * steps)
    if warmup >= steps:
        raise RecipeError(f"recipe key warmup_steps={warmup} is not smaller than train_steps={steps}; lower it")
    how = (f"train_steps={steps} as given ({steps / per_epoch:.2f} epochs)" if optim.train_steps else
           f"{steps} steps = {recipe.task.epochs} epochs x {per_epoch} ({train_rows:,} rows // global batch "
           f"{layout.global_batch_size})")
    say(f"training {how}, warmup {warmup} steps")
    optim = dataclasses.replace(optim, train_steps=steps, warmup_steps=warmup, warmup_fraction=0.0)
    return dataclasses.replace(recipe, optim=optim)


__all__ = ["FINETUNE_REASONS", "ModelSource", "check_layout", "find_finetune_checkpoint",
           "finetune_checkpoint_metadata", "load_data", "load_tokenizer", "plan_steps", "resolve_model"]
