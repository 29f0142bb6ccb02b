"""`megahf pretrain`: train a Megatron GPT or BERT from scratch with `transformers.Trainer`.

    from megahf.training import load_recipe, pretrain
    metrics = pretrain(load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50"]))

What Megatron's `pretrain_gpt.py` and `pretrain_bert.py` do, in transformers terms: AdamW without weight decay on
biases and norm weights, linear warmup then cosine (or linear) decay to `min_learning_rate` (or constant), global
gradient-norm clipping, evaluation every `eval_interval` steps. At the end: validation loss and perplexity, a sample (GPT: generated text;
BERT: the words predicted at [MASK]), the model and tokenizer saved to `output_dir/final` (loadable with
`AutoModelForCausalLM` / `AutoModelForPreTraining.from_pretrained` after `import megahf`),
the loss curves in `output_dir/loss.png` and the numbers in `output_dir/metrics.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from ..parallel import clip_grad_norm_, distribute_model
from ..parallel.layout import ParallelLayout
from . import checkpoint as ckpt
from .callbacks import CheckpointCallback, MegatronLogCallback
from .data import PackedCorpus, load_tokenizer
from .families import family_of
from .flops import peak_tflops_per_device, training_flops_per_token
from .recipe import PretrainRecipe, RecipeError, save_recipe


def say(message: str) -> None:
    if _is_rank_zero():
        print(f"[megahf] {message}", flush=True)


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class MegatronTrainer(Trainer):
    """Trainer with Megatron's choices where Trainer's defaults differ, and megahf's checkpoints (one format for
    every layout, tensor parallel included, which Trainer's own cannot resume)."""

    def __init__(self, *args, recipe: PretrainRecipe, checkpoint_metadata: dict | None = None,
                 progress: MegatronLogCallback | None = None, **kwargs):
        self.recipe = recipe
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.progress = progress
        super().__init__(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.progress is not None and "loss" in logs:
            self.progress.add_throughput(self.state, logs)  # into log_history and every tracker
        super().log(logs, start_time)

    # ---- gradient clipping across meshes (TP-only, FSDP2 and TP x FSDP2 parameters side by side)

    def _clip_grad_norm(self, model):
        if self.is_distributed_loading_by_transformers:
            return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    # ---- checkpoints (written when CheckpointCallback asks; read by Trainer's resume path)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def _save_checkpoint(self, model, trial) -> None:
        path = ckpt.save_checkpoint(
            Path(self.args.output_dir) / "checkpoints", self.state.global_step, self.model, self._torch_optimizer(),
            self.lr_scheduler, self.state, self.checkpoint_metadata, keep_last=self.recipe.keep_last,
        )
        say(f"checkpoint {path}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        ckpt.load_model(resume_from_checkpoint, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            ckpt.load_optimizer(checkpoint, self.model, self._torch_optimizer())
            ckpt.load_scheduler(checkpoint, self.lr_scheduler)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            ckpt.load_rng(checkpoint)

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

    model: Any  # MegatronGPTForCausalLM or MegatronBertForPreTraining
    tokenizer: Any
    trainer: MegatronTrainer
    metrics: dict[str, Any]
    output_dir: Path


def training_arguments(recipe: PretrainRecipe, layout: ParallelLayout | None = None) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    layout = layout or recipe.layout(1)
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
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
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
        save_strategy="no",  # checkpoints are megahf's (CheckpointCallback); the final save is pretrain()'s
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


def build_model(recipe: PretrainRecipe, tokenizer, layout: ParallelLayout | None = None):
    """A freshly initialized model of the recipe's shape, its vocabulary sized to the tokenizer, sharded as the
    layout says (tensor parallel and/or FSDP2 through transformers' DistributedConfig). Every rank initialises the
    full model from the recipe's seed, so each keeps its slice of the same model as one process would build."""
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
    family = family_of(recipe)
    if family.name == "gpt":
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    else:
        config.pad_token_id = tokenizer.pad_token_id
    config.check()
    tp = layout.tensor_parallel_size if layout else 1
    try:
        config.check_tensor_parallel(tp)
    except ValueError as error:  # the tokenizer's vocabulary sets the padded size
        raise RecipeError(f"tensor_parallel_size={tp} with tokenizer={recipe.tokenizer!r}: {error}") from None
    torch.manual_seed(recipe.seed)
    model = family.model_class(config)
    if family.name == "gpt":
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = config.bos_token_id
    if layout is not None and layout.sharded:
        model = distribute_model(model, layout.distributed_config())
    return model


def save_final(model, tokenizer, output_dir: Path) -> Path:
    """Write `output_dir/final` so that it is either the complete new checkpoint or not there at all. Called on
    every rank: a sharded model is gathered, rank 0 writes."""
    final, partial, old = output_dir / "final", output_dir / ".final.partial", output_dir / ".final.old"
    if _is_rank_zero():
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    model.save_pretrained(partial, is_main_process=_is_rank_zero())
    if not _is_rank_zero():
        return final
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


def prepare_processes(layout: ParallelLayout) -> None:
    """Make a multi-process CPU launch (plain torchrun) a real gloo run, and let a tensor-parallel model train
    there. Without ACCELERATE_USE_CPU accelerate would see `DistributedType.NO` in every process and each would
    train alone, silently."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise RecipeError(
            "the launch config enables accelerate's FSDP plugin (distributed_type: FSDP), which would shard the model "
            "a second time: megahf shards it from the recipe's fsdp_size and tensor_parallel_size; launch with a "
            "MULTI_GPU config such as recipes/accelerate/fsdp2.yaml"
        )
    if torch.cuda.is_available() or layout.world_size == 1:
        return
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if layout.tensor_parallel_size > 1:
        from ..parallel.accelerate_cpu import allow_parallelism_config_on_cpu

        allow_parallelism_config_on_cpu()


def checkpoint_metadata(recipe: PretrainRecipe, layout: ParallelLayout) -> dict:
    """What a resume must agree with (the data position is global_step x global batch of seq_length samples)."""
    return {"global_batch_size": layout.global_batch_size, "seq_length": recipe.seq_length, "seed": recipe.seed,
            "world_size": layout.world_size, "tensor_parallel_size": layout.tensor_parallel_size,
            "fsdp_size": layout.fsdp_size, "train_steps": recipe.train_steps}


def find_resume_checkpoint(recipe: PretrainRecipe, layout: ParallelLayout) -> Path | None:
    """The checkpoint to resume from (`resume: auto|none|PATH`), checked against the recipe before anything is
    built. Rank 0 decides and tells the others, so that all ranks load the same one."""
    path: Path | None = None
    if recipe.resume == "auto":
        if _is_rank_zero():
            path = ckpt.latest_checkpoint(Path(recipe.output_dir) / "checkpoints")
        if dist.is_available() and dist.is_initialized():
            holder = [str(path) if path else ""]
            dist.broadcast_object_list(holder, src=0)
            path = Path(holder[0]) if holder[0] else None
    elif recipe.resume != "none":
        path = Path(recipe.resume)
        problem = ckpt.checkpoint_problem(path)
        if problem:
            raise RecipeError(f"recipe key resume={recipe.resume!r}: that checkpoint is unusable ({problem}); "
                              "name a complete one, or use resume: auto")
    if path is None:
        return None
    saved, now = ckpt.read_metadata(path), checkpoint_metadata(recipe, layout)
    layout_reason = "resuming needs the layout it was written with"  # optimizer groups and RNG streams follow it
    reasons = {"global_batch_size": "the data position would not match", "seq_length": "the data position would "
               "not match", "seed": "the data position would not match", "world_size": layout_reason,
               "tensor_parallel_size": layout_reason, "fsdp_size": layout_reason}
    for key, reason in reasons.items():
        if saved.get(key) != now[key]:
            fix = f"launch {saved.get(key)} processes" if key == "world_size" else f"set {key} to {saved.get(key)}"
            raise RecipeError(
                f"checkpoint {path} was written with {key}={saved.get(key)}, the recipe and launch now give "
                f"{now[key]}: {reason}; {fix}, or resume: none (or another output_dir) to start afresh"
            )
    return path


def run_pretrain(recipe: PretrainRecipe, callbacks: list[TrainerCallback] | None = None) -> PretrainResult:
    """Train as the recipe says and write the run's outputs; return the model with the metrics. Under a launcher
    (torchrun, accelerate launch) every process calls it; the recipe's layout says how they split the work.
    Extra `callbacks` are added to the Trainer's."""
    start = time.perf_counter()
    recipe.validate()
    layout = recipe.layout()  # the world size must fit before anything is computed
    prepare_processes(layout)
    set_seed(recipe.seed)

    tokenizer = load_tokenizer(recipe)
    args = training_arguments(recipe, layout)  # starts the process group under a launcher
    if args.world_size != layout.world_size:
        raise RecipeError(f"the launcher started {args.world_size} processes but WORLD_SIZE says {layout.world_size}")
    resume_from = find_resume_checkpoint(recipe, layout)
    family = family_of(recipe)
    data: PackedCorpus = family.build_data(recipe, tokenizer, layout)
    say(f"data: {data.describe()}")
    model = build_model(recipe, tokenizer, layout)
    config = model.config
    with torch.device("meta"):  # the whole model's count, whatever slice of it this rank holds
        n_params = sum(p.numel() for p in family.model_class(config).parameters())
    say(
        f"model: {recipe.model} ({n_params / 1e6:.2f}M parameters, {config.num_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size} padded to {config.padded_vocab_size}); {layout.describe()}"
    )

    tokens_per_step = layout.global_batch_size * recipe.seq_length
    _barrier()  # on CPU rank 0 measures the matmul peak while the other ranks wait (idle) at the next barrier
    peak_tflops, peak_source = peak_tflops_per_device(recipe.peak_tflops) if _is_rank_zero() else (float("nan"), "")
    _barrier()
    devices = layout.world_size if torch.cuda.is_available() else max(1, layout.world_size // _local_world_size())
    flops_per_token = training_flops_per_token(config, recipe.seq_length)
    progress = MegatronLogCallback(tokens_per_step, flops_per_token=flops_per_token,
                                   peak_flops=peak_tflops * 1e12 * devices,
                                   perplexity=family.name == "gpt")
    trainer = MegatronTrainer(
        model=model,
        args=args,
        data_collator=family.collate(recipe),
        train_dataset=data.train,
        eval_dataset=data.valid,
        processing_class=tokenizer,
        recipe=recipe,
        checkpoint_metadata=checkpoint_metadata(recipe, layout),
        progress=progress,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    if recipe.save_interval:
        trainer.add_callback(CheckpointCallback(recipe.save_interval))
    for callback in callbacks or []:
        trainer.add_callback(callback)
    samples = recipe.train_steps * layout.global_batch_size
    say(
        f"training {recipe.train_steps} steps x {tokens_per_step:,} tokens on {args.device} "
        f"({samples / len(data.train):.2f} epochs of the train split), lr {recipe.learning_rate:g} "
        f"{recipe.lr_schedule} -> {recipe.min_learning_rate:g}, warmup {recipe.warmup_steps}; MFU against "
        f"{peak_tflops * devices:.3g} TFLOP/s ({peak_source}{f' x {devices}' if devices > 1 else ''})"
    )
    if resume_from is not None and ckpt.read_metadata(resume_from)["step"] >= recipe.train_steps:
        # Trainer would run one more step past max_steps (it checks for the end after a step): load the trained
        # model and its history instead, as Megatron does when iteration >= train_iters.
        say(f"{resume_from} has finished training: evaluating and saving it")
        ckpt.load_model(resume_from, model)
        trainer.state = TrainerState.load_from_json(str(resume_from / ckpt.TRAINER_STATE))
        train_metrics = {}
    else:
        if resume_from is not None:
            say(f"resuming from {resume_from}")
        train_metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics

    # Validation at the end (GPT: reusing the evaluation of the last step if Trainer just did it).
    validation = family.validate(trainer)
    valid_loss, valid_ppl = validation["valid_loss"], validation["valid_ppl"]
    extra = "".join(f", {k.removeprefix('valid_').replace('_', ' ')} {v:.4f}" for k, v in validation.items()
                    if k not in ("valid_loss", "valid_ppl"))
    say(f"validation: loss {valid_loss:.4f}, {family.ppl_label} {valid_ppl:,.2f}{extra} "
        f"({len(data.valid)} samples)")
    history = trainer.state.log_history
    last_eval = {"eval_loss": valid_loss, "step": trainer.state.global_step}

    sample = family.sample(model, tokenizer, recipe)  # every rank: a sharded model's forward is collective
    if sample:
        say(f"sample (sample_top_k={recipe.sample_top_k}, seed {recipe.seed}):")
        if _is_rank_zero():
            print(sample, flush=True)

    output_dir = Path(recipe.output_dir)
    if _is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
    train_losses = [e["loss"] for e in history if "loss" in e]
    train_seconds = progress.train_seconds or train_metrics.get("train_runtime", float("nan"))
    tokens_per_second = progress.tokens_seen / train_seconds if progress.tokens_seen else None
    metrics = {
        "model": recipe.model,
        "parameters": n_params,
        "layout": layout.describe(),
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.global_step * tokens_per_step,
        "epochs": trainer.state.epoch,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "valid_loss": valid_loss,
        "valid_ppl": valid_ppl,
        **{k: v for k, v in validation.items() if k not in ("valid_loss", "valid_ppl")},
        "tokens_per_second": tokens_per_second,
        "model_tflops_per_second": tokens_per_second * flops_per_token / 1e12 if tokens_per_second else None,
        "peak_tflops": peak_tflops * devices,
        "peak_source": peak_source,
        "mfu": progress.mfu(tokens_per_second),
        "train_time_s": train_metrics.get("train_runtime"),
        "device": str(args.device),
        "resumed_from": str(resume_from) if resume_from else None,
        "sample": sample,
    }
    final = save_final(model, tokenizer, output_dir)
    if trainer.is_world_process_zero():
        evaluated = any(e.get("eval_loss") is not None and e["step"] == last_eval["step"] for e in history)
        plot_losses(history + ([] if evaluated else [last_eval]), output_dir / "loss.png",
                    f"{recipe.model}: {metrics['steps']} steps, valid {family.ppl_label} {valid_ppl:,.1f}")
        save_recipe(recipe, output_dir / "recipe.yaml")
        metrics["wall_time_s"] = time.perf_counter() - start
        write_json(metrics, output_dir / "metrics.json")
        say(f"saved {final} ({family.auto_class}.from_pretrained after `import megahf`), "
            f"{output_dir / 'loss.png'}, {output_dir / 'metrics.json'}")
    else:
        metrics["wall_time_s"] = time.perf_counter() - start
    _barrier()
    mfu = f", MFU {metrics['mfu']:.1%}" if metrics["mfu"] is not None else ""
    say(f"done in {metrics['wall_time_s']:.0f}s: train loss {metrics['first_train_loss']:.3f} -> "
        f"{metrics['final_train_loss']:.3f}, valid {family.ppl_label} {valid_ppl:,.2f}, "
        f"{metrics['tokens_per_second'] or 0:,.0f} tokens/s{mfu}")
    return PretrainResult(model=model, tokenizer=tokenizer, trainer=trainer, metrics=metrics, output_dir=output_dir)


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def pretrain(recipe: PretrainRecipe) -> dict[str, Any]:
    """Train as the recipe says, write `final/`, `loss.png`, `metrics.json`, `recipe.yaml`; return the metrics."""
    return run_pretrain(recipe).metrics


__all__ = ["MegatronTrainer", "PretrainResult", "pretrain", "run_pretrain", "training_arguments"]
