"""What differs between pretraining Megatron's GPT and its BERT, in one place: the model class, the end-of-run
validation and the sample shown to the user (the data is `megahf.data.pretraining_data`'s). `run_pretrain` asks
`family_of(recipe)` and is the same for both."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..models.bert import MegatronBertForPreTraining
from ..models.gpt import MegatronGPTForCausalLM
from ..recipe import PretrainRecipe
from .log import say
from .model_source import model_family


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    auto_class: str  # the Auto class that loads the saved model (after `import megahf`)
    validate: Callable[[Any], dict[str, float]]  # (trainer) -> valid_loss, valid_ppl, ...
    sample: Callable[[Any, Any, PretrainRecipe], str]  # (model, tokenizer, recipe)
    ppl_label: str  # what valid_ppl is the perplexity of, as printed: "ppl" or "masked-LM ppl"


# ---------------------------------------------------------------------------------------------------- GPT


def _gpt_validate(trainer) -> dict[str, float]:
    """The validation loss of the last step (reusing Trainer's evaluation if it just ran) and its perplexity."""
    history = trainer.state.log_history
    last_eval = next((e for e in reversed(history) if "eval_loss" in e), None)
    if last_eval is None or last_eval["step"] != trainer.state.global_step:
        last_eval = {**trainer.evaluate(), "step": trainer.state.global_step}
    loss = float(last_eval["eval_loss"])
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_sample(model, tokenizer, recipe: PretrainRecipe) -> str:
    """Continue `sample_prompt` by `sample_tokens` tokens (seeded top-k sampling, or greedy with top_k 0)."""
    if recipe.run.sample_tokens == 0:
        return ""
    if hasattr(model, "_megahf_pipeline"):
        say("sample: none under pipeline parallelism (each rank holds some of the layers); generate from final/")
        return ""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(recipe.run.sample_prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    max_new = recipe.run.sample_tokens
    limit = model.config.max_position_embeddings if model.config.position_embedding_type == "learned_absolute" else None
    if limit is not None:
        ids = ids[-(limit - 1):]
        max_new = min(max_new, limit - len(ids))
    torch.manual_seed(recipe.run.seed)
    top_k = recipe.run.sample_top_k
    sampling = {"do_sample": True, "top_k": top_k} if top_k > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new,
        **sampling,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------- BERT


@torch.no_grad()
def _bert_validate(trainer) -> dict[str, float]:
    """Masked-LM loss and perplexity, sentence-order loss and accuracy over the validation split (Megatron reports
    the two losses apart; their sum is Trainer's eval_loss)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    device = trainer.args.device
    # mlm loss sum, masked tokens, sop loss sum, sop correct, pairs: on the device (NCCL reduces device tensors only;
    # no host sync per batch)
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in trainer.get_eval_dataloader():
        batch = {k: v.to(device) for k, v in batch.items()}
        order = batch.pop("next_sentence_label", None)
        out = model(**batch)  # masked-LM loss only: the sentence-order label is left out
        masked = (batch["labels"] != -100).sum()
        totals[0] += out.loss.double() * masked
        totals[1] += masked
        if order is not None and out.seq_relationship_logits is not None:
            logits = out.seq_relationship_logits.float()
            totals[2] += torch.nn.functional.cross_entropy(logits, order, reduction="sum").double()
            totals[3] += (logits.argmax(-1) == order).sum()
            totals[4] += order.numel()
    if dist.is_available() and dist.is_initialized():
        # tensor-parallel ranks see the same batches: every sum and count is multiplied alike
        dist.all_reduce(totals)
    model.train(was_training)
    mlm = (totals[0] / totals[1]).item()
    result = {"valid_mlm_loss": mlm, "valid_ppl": math.exp(min(mlm, 50.0))}
    if totals[4] > 0:
        result["valid_sop_loss"] = (totals[2] / totals[4]).item()
        result["valid_sop_accuracy"] = (totals[3] / totals[4]).item()
    result["valid_loss"] = mlm + result.get("valid_sop_loss", 0.0)
    return result


@torch.no_grad()
def fill_mask_sample(model, tokenizer, recipe: PretrainRecipe) -> str:
    """The `sample_top_k` most likely words at each [MASK] of `sample_prompt` (one is appended if it has none)."""
    if recipe.run.sample_tokens == 0:
        return ""
    mask = tokenizer.mask_token
    text = recipe.run.sample_prompt if mask in recipe.run.sample_prompt else f"{recipe.run.sample_prompt} {mask}"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = tokenizer(text, return_tensors="pt", truncation=True).to(device)
    logits = model(**batch).prediction_logits[0]
    model.train(was_training)
    lines = [text]
    for position in (batch["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist():
        top = logits[position].float().softmax(-1).topk(max(1, recipe.run.sample_top_k))
        words = [f"{tokenizer.decode([i]).strip()} ({p:.2f})"
                 for p, i in zip(top.values.tolist(), top.indices.tolist())]
        lines.append(f"  [MASK] at {position}: " + ", ".join(words))
    return "\n".join(lines)


FAMILIES = {
    "gpt": Family("gpt", MegatronGPTForCausalLM, "AutoModelForCausalLM", _gpt_validate, generate_sample, "ppl"),
    "bert": Family("bert", MegatronBertForPreTraining, "AutoModelForPreTraining", _bert_validate, fill_mask_sample,
                   "masked-LM ppl"),
}


def family_of(recipe: PretrainRecipe) -> Family:
    return FAMILIES[model_family(recipe.model)]


__all__ = ["FAMILIES", "Family", "family_of", "fill_mask_sample", "generate_sample"]
