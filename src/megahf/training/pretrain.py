"""`megahf pretrain`: train a MegatronGPT from scratch on a packed text corpus with `transformers.Trainer`.

    from megahf.training import load_recipe, pretrain
    metrics = pretrain(load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50"]))

What Megatron's `pretrain_gpt.py` does, in transformers terms: AdamW without weight decay on biases and norm weights,
linear warmup then cosine (or linear) decay to `min_learning_rate` (or constant), global gradient-norm clipping,
evaluation every `eval_interval` steps. At the end: validation loss and perplexity, a generated sample, the model and
tokenizer saved to `output_dir/final` (loadable with `AutoModelForCausalLM.from_pretrained` after `import megahf`),
the loss curves in `output_dir/loss.png` and the numbers in `output_dir/metrics.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from ..models.gpt import MegatronGPTForCausalLM
from .callbacks import MegatronLogCallback
from .data import PackedCorpus, build_corpus, build_indexed_data, collate_blocks, collate_samples, load_tokenizer
from .recipe import PretrainRecipe, RecipeError, save_recipe


def say(message: str) -> None:
    print(f"[megahf] {message}", flush=True)


class MegatronTrainer(Trainer):
    """Trainer with Megatron's choices where Trainer's defaults differ."""

    def __init__(self, *args, recipe: PretrainRecipe, **kwargs):
        self.recipe = recipe
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # Megatron decays every weight matrix and embedding, never a bias or a 1-D parameter (norm weights). Trainer's
        # default goes by module type and by name patterns; this rule does not depend on how a module is named.
        return [name for name, param in model.named_parameters() if param.ndim > 1 and not name.endswith(".bias")]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # transformers' "linear" decays to 0; Megatron's linear style decays to min_lr.
        if self.lr_scheduler is None and self.recipe.lr_schedule == "linear":
            warmup, peak, floor = self.recipe.warmup_steps, self.recipe.learning_rate, self.recipe.min_learning_rate

            def factor(step: int) -> float:
                if step < warmup:
                    return step / warmup
                progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
                return (floor + (peak - floor) * (1.0 - progress)) / peak

            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return super().create_scheduler(num_training_steps, optimizer)


@dataclass
class PretrainResult:
    """What a run leaves behind: the trained model (in memory), its tokenizer, the Trainer, the metrics."""

    model: MegatronGPTForCausalLM
    tokenizer: Any
    trainer: MegatronTrainer
    metrics: dict[str, Any]
    output_dir: Path


def training_arguments(recipe: PretrainRecipe) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    schedule = {
        "cosine": ("cosine_with_min_lr", {"min_lr": recipe.min_learning_rate}),
        "linear": ("linear", {}),  # replaced by MegatronTrainer.create_scheduler (decay to min_lr)
        "constant": ("constant_with_warmup", {}),
    }[recipe.lr_schedule]
    return TrainingArguments(
        output_dir=recipe.output_dir,
        max_steps=recipe.train_steps,
        per_device_train_batch_size=recipe.micro_batch_size,
        per_device_eval_batch_size=recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=schedule[0],
        lr_scheduler_kwargs=schedule[1],
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        adam_beta1=recipe.adam_beta1,
        adam_beta2=recipe.adam_beta2,
        adam_epsilon=recipe.adam_eps,
        optim="adamw_torch_fused",  # one fused kernel per step (CPU and GPU); several times faster than the loop
        max_grad_norm=recipe.clip_grad,  # 0 turns clipping off
        logging_strategy="steps",
        logging_steps=recipe.log_interval,
        logging_first_step=True,
        eval_strategy="steps" if recipe.eval_interval > 0 else "no",
        eval_steps=recipe.eval_interval if recipe.eval_interval > 0 else None,
        prediction_loss_only=True,  # never keep b x s x vocab logits of the whole validation split
        save_strategy="no",  # the final save is pretrain()'s, atomic
        report_to=[r.strip() for r in recipe.report_to.split(",")],
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=recipe.num_workers,
        dataloader_pin_memory=on_gpu,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=recipe.activation_checkpointing,
        disable_tqdm=False,
    )


def build_model(recipe: PretrainRecipe, tokenizer) -> MegatronGPTForCausalLM:
    """A freshly initialized model of the recipe's shape, its vocabulary sized to the tokenizer."""
    vocab = len(tokenizer)
    wanted = recipe.model_overrides.get("vocab_size")
    if wanted is not None and wanted < vocab:
        raise RecipeError(
            f"model_overrides.vocab_size={wanted} is smaller than the tokenizer's {vocab} tokens; "
            f"remove it or set it to at least {vocab}"
        )
    config = recipe.build_config()
    if wanted is None:
        config.vocab_size = vocab
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config.check()
    model = MegatronGPTForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


@torch.no_grad()
def generate_sample(model, tokenizer, recipe: PretrainRecipe) -> str:
    """Continue `sample_prompt` by `sample_tokens` tokens (seeded top-k sampling, or greedy with top_k 0)."""
    if recipe.sample_tokens == 0:
        return ""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(recipe.sample_prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    max_new = recipe.sample_tokens
    limit = model.config.max_position_embeddings if model.config.position_embedding_type == "learned_absolute" else None
    if limit is not None:
        ids = ids[-(limit - 1):]
        max_new = min(max_new, limit - len(ids))
    torch.manual_seed(recipe.seed)
    sampling = {"do_sample": True, "top_k": recipe.sample_top_k} if recipe.sample_top_k > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new,
        **sampling,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=False)


def save_final(model, tokenizer, output_dir: Path) -> Path:
    """Write `output_dir/final` so that it is either the complete new checkpoint or not there at all."""
    final, partial, old = output_dir / "final", output_dir / ".final.partial", output_dir / ".final.old"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)
    return final


def plot_losses(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_pretrain(recipe: PretrainRecipe) -> PretrainResult:
    """Train as the recipe says and write the run's outputs; return the model with the metrics."""
    start = time.perf_counter()
    recipe.validate()
    set_seed(recipe.seed)

    tokenizer = load_tokenizer(recipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data_path:
        data: PackedCorpus = build_indexed_data(recipe, world_size)
    else:
        data = build_corpus(recipe, tokenizer)
    say(f"data: {data.describe()}")
    model = build_model(recipe, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {recipe.model} ({n_params / 1e6:.2f}M parameters, {model.config.num_layers} layers, hidden "
        f"{model.config.hidden_size}, vocab {model.config.vocab_size} padded to {model.config.padded_vocab_size})"
    )

    args = training_arguments(recipe)
    tokens_per_step = recipe.tokens_per_step * args.world_size
    progress = MegatronLogCallback(tokens_per_step)
    trainer = MegatronTrainer(
        model=model,
        args=args,
        data_collator=collate_samples if recipe.data_path else collate_blocks,
        train_dataset=data.train,
        eval_dataset=data.valid,
        processing_class=tokenizer,
        recipe=recipe,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    samples = recipe.train_steps * recipe.micro_batch_size * recipe.gradient_accumulation_steps * args.world_size
    say(
        f"training {recipe.train_steps} steps x {tokens_per_step:,} tokens on {args.device} "
        f"({samples / len(data.train):.2f} epochs of the train split), lr {recipe.learning_rate:g} "
        f"{recipe.lr_schedule} -> {recipe.min_learning_rate:g}, warmup {recipe.warmup_steps}"
    )
    train_output = trainer.train()

    # Validation at the end (reusing the evaluation of the last step if Trainer just did it).
    history = trainer.state.log_history
    last_eval = next((e for e in reversed(history) if "eval_loss" in e), None)
    if last_eval is None or last_eval["step"] != trainer.state.global_step:
        last_eval = {**trainer.evaluate(), "step": trainer.state.global_step}
    valid_loss = float(last_eval["eval_loss"])
    valid_ppl = math.exp(min(valid_loss, 50.0))
    say(f"validation: loss {valid_loss:.4f}, perplexity {valid_ppl:,.2f} ({len(data.valid)} blocks)")

    sample = generate_sample(model, tokenizer, recipe)
    if sample:
        say(f"sample ({recipe.sample_tokens} tokens, top_k={recipe.sample_top_k}, seed {recipe.seed}):")
        print(sample, flush=True)

    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_losses = [e["loss"] for e in history if "loss" in e]
    train_seconds = progress.train_seconds or train_output.metrics.get("train_runtime", float("nan"))
    metrics = {
        "model": recipe.model,
        "parameters": n_params,
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.global_step * tokens_per_step,
        "epochs": trainer.state.epoch,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "valid_loss": valid_loss,
        "valid_ppl": valid_ppl,
        "tokens_per_second": progress.tokens_seen / train_seconds if progress.tokens_seen else None,
        "train_time_s": train_output.metrics.get("train_runtime"),
        "device": str(args.device),
        "sample": sample,
    }
    if trainer.is_world_process_zero():
        final = save_final(model, tokenizer, output_dir)
        plot_losses(history + ([last_eval] if last_eval not in history else []), output_dir / "loss.png",
                    f"{recipe.model}: {metrics['steps']} steps, valid ppl {valid_ppl:,.1f}")
        save_recipe(recipe, output_dir / "recipe.yaml")
        metrics["wall_time_s"] = time.perf_counter() - start
        write_json(metrics, output_dir / "metrics.json")
        say(f"saved {final} (AutoModelForCausalLM.from_pretrained after `import megahf`), "
            f"{output_dir / 'loss.png'}, {output_dir / 'metrics.json'}")
    else:
        metrics["wall_time_s"] = time.perf_counter() - start
    say(f"done in {metrics['wall_time_s']:.0f}s: train loss {metrics['first_train_loss']:.3f} -> "
        f"{metrics['final_train_loss']:.3f}, valid ppl {valid_ppl:,.2f}, {metrics['tokens_per_second'] or 0:,.0f} "
        "tokens/s")
    return PretrainResult(model=model, tokenizer=tokenizer, trainer=trainer, metrics=metrics, output_dir=output_dir)


def pretrain(recipe: PretrainRecipe) -> dict[str, Any]:
    """Train as the recipe says, write `final/`, `loss.png`, `metrics.json`, `recipe.yaml`; return the metrics."""
    return run_pretrain(recipe).metrics


__all__ = ["MegatronTrainer", "PretrainResult", "pretrain", "run_pretrain", "training_arguments"]
