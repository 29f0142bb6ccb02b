"""The model `megahf finetune` trains: the pretrained encoder with the task's head (`build_task_model`; QLoRA loads
its linear layers in 4-bit nf4), LoRA adapters on it (`apply_peft`), sharded as the layout says (`shard_model`: the
adapters with their base layers).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from ..adapter_folder import merge_adapter
from ..models.bert import MegatronBertConfig, MegatronBertForMultipleChoice, MegatronBertForSequenceClassification
from ..parallel import distribute_model
from ..parallel.layout import ParallelLayout
from ..recipe import FinetuneRecipe, RecipeError
from ..tasks.finetuning import FinetuneTask
from .finetune_setup import ModelSource
from .log import say

HEADS = {  # task.head -> (model class, Auto class, name of the task head module)
    "sequence_classification": (MegatronBertForSequenceClassification, AutoModelForSequenceClassification,
                                "classification_head"),
    "multiple_choice": (MegatronBertForMultipleChoice, AutoModelForMultipleChoice, "multichoice_head"),
}


def build_task_model(recipe: FinetuneRecipe, task: FinetuneTask, source: ModelSource, tokenizer):
    """The pretrained encoder with a new task head (random weights from the recipe's seed, the same on every rank),
    whole on every rank (`shard_model` shards it, after `apply_peft`). QLoRA loads the linear layers in 4-bit nf4."""
    model_class, auto_class, head = HEADS[task.head]
    labels: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id}
    if task.head == "sequence_classification":
        labels.update(num_labels=task.num_labels,
                      problem_type="regression" if task.is_regression else "single_label_classification")
        if task.label_names:
            labels.update(id2label=dict(enumerate(task.label_names)),
                          label2id={name: i for i, name in enumerate(task.label_names)})
    torch.manual_seed(recipe.run.seed)
    if not source.pretrained:
        config = MegatronBertConfig.from_preset(source.name, vocab_size=len(tokenizer), **labels)
        model = model_class(config)
        say(f"model: {source.name} with a new {head} (random weights everywhere)")
        if recipe.optim.train_steps == 0:
            raise RecipeError(f"recipe key epochs=0 predicts with the model's own {task.name} head, but "
                              f"model={source.name!r} is a preset (random weights); give a model fine-tuned on "
                              f"{task.name}, or epochs >= 1")
    else:
        quantization = qlora_loading(task, head) if recipe.peft.peft == "qlora" else {}
        try:
            # A head of another size (a model fine-tuned on MNLI, continued on RTE) is re-initialised, not refused;
            # any other tensor of the wrong size is refused below.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its table of unused and new weights: the one line below says it
            try:
                model, info = auto_class.from_pretrained(source.weights, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **labels, **quantization)
            finally:
                hf_logging.set_verbosity(verbosity)
        except (RuntimeError, ValueError, ImportError) as error:
            if quantization:
                raise RecipeError(f"recipe key peft='qlora': bitsandbytes cannot load a 4-bit model here "
                                  f"({str(error).splitlines()[0]}); use peft: lora") from None
            raise
        if not isinstance(model, model_class):
            raise RecipeError(f"recipe key model={source.name!r} loaded as {type(model).__name__}, not "
                              f"{model_class.__name__}")
        new = sorted({*info["missing_keys"], *(m[0] for m in info.get("mismatched_keys", []))})
        if source.adapter_of:
            model, head_loaded = merge_adapter_folder(model, source.name, head)
            new = [k for k in new if not (head_loaded and k.startswith(head))]
        stray = [k for k in new if not k.startswith(head)]
        if stray:
            raise RecipeError(
                f"recipe key model={source.name!r}: {len(stray)} encoder tensors are missing from its weights or of "
                f"another shape (e.g. {stray[0]}); give a complete pretrained BERT folder"
            )
        dropped = sorted({k.split(".")[0] for k in info["unexpected_keys"]})
        outputs = 1 if task.head == "multiple_choice" else task.num_labels
        fate = (f"newly initialised ({outputs} output{'s' if outputs > 1 else ''})" if new else
                f"loaded from the {'adapter' if source.adapter_of else 'folder'} (continuing its fine-tuning)")
        heads = f"its other heads dropped ({', '.join(dropped)})" if dropped else "no other head in the folder"
        merged = f" (a peft adapter merged into its base {source.adapter_of})" if source.adapter_of else ""
        say(f"model: {source.name}{merged}: pretrained encoder loaded, {heads}; task head {head} {fate}")
        if new and recipe.optim.train_steps == 0:
            raise RecipeError(f"recipe key epochs=0 predicts with the model's own {task.name} head, but "
                              f"model={source.name!r} has none (its {head} is newly initialised); give a model "
                              f"fine-tuned on {task.name}, or epochs >= 1")
    return model


def shard_model(model, layout: ParallelLayout):
    """Shard the task model as the layout says (tensor parallel and/or FSDP2; DDP is the Trainer's). With LoRA the
    base model inside peft's wrapper is sharded, its adapters with it (`megahf.parallel.lora`)."""
    if layout.sharded:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        distributed = distribute_model(inner, layout.distributed_config())
        if inner is model:
            model = distributed
    return model


def merge_adapter_folder(model, adapter: str, head: str):
    """`model` with the adapter folder `adapter` merged in; its fully trained task head replaces the new one when it
    has this task's shape. Returns the model and whether the head came from the adapter."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as saved:
        shapes = {key: saved.get_slice(key).get_shape() for key in saved.keys()}
    own = {f"{head}.{name}": list(p.shape) for name, p in model.get_submodule(head).named_parameters()}
    saved_head = {key.split(f"{head}.", 1)[1]: shape for key, shape in shapes.items()
                  if f".{head}." in f".{key}" and ".lora_" not in key}
    keep = bool(saved_head) and all(own.get(f"{head}.{name}") == shape for name, shape in saved_head.items())
    return merge_adapter(model, adapter, keep_head=keep), keep


def qlora_loading(task: FinetuneTask, head: str) -> dict[str, Any]:
    """`from_pretrained` arguments of QLoRA's base: every linear layer but the task head in 4-bit nf4 (double
    quantization, as the QLoRA paper), computing in bf16 on GPUs and fp32 on CPU."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise RecipeError(f"recipe key peft='qlora' needs bitsandbytes ({error}); install megahf[tasks] or use "
                          "peft: lora") from None
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"  # this process's GPU
    # The packed 4-bit values are stored in the compute dtype: FSDP shards float tensors, and every parameter of an
    # FSDP unit then has one dtype (bitsandbytes' FSDP-QLoRA guide); the values are the same in any storage.
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
                                llm_int8_skip_modules=[head])
    return {"quantization_config": config, "device_map": {"": device}}


def lora_target_pattern(names: list[str]) -> str:
    """peft's regex form of `lora_target_modules` (`*` within one module name), matched on full module names."""
    alternatives = "|".join(re.escape(n).replace(r"\*", r"[^.]*") for n in names)
    return rf"(?:.*\.)?(?:{alternatives})"


def apply_peft(recipe: FinetuneRecipe, task: FinetuneTask, model):
    """LoRA (and QLoRA's k-bit preparation) with the task head trained fully; the model itself for peft: none."""
    method = recipe.peft.peft
    if method == "none":
        return model
    _, _, head = HEADS[task.head]
    names = recipe.peft.target_names
    # nn.Linear, or bitsandbytes' Linear4bit under QLoRA
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pattern = lora_target_pattern(names)
    for name in names:
        one = lora_target_pattern([name])
        if not any(re.fullmatch(one, n) for n in linear_names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names if not n.startswith(head)})
            raise RecipeError(f"recipe key lora_target_modules={recipe.peft.lora_target_modules!r}: {name!r} names "
                              f"no linear layer of the model; its linear layers are {', '.join(leaves)}")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=recipe.peft.lora_rank, lora_alpha=recipe.peft.lora_alpha,
                        lora_dropout=recipe.peft.lora_dropout, target_modules=pattern, modules_to_save=[head],
                        task_type="SEQ_CLS" if task.head == "sequence_classification" else None)
    return get_peft_model(model, config)


__all__ = ["HEADS", "apply_peft", "build_task_model", "lora_target_pattern", "qlora_loading", "shard_model"]
