"""`megahf pretrain`: train a Megatron GPT or BERT from scratch with `transformers.Trainer`.

    from megahf.training import load_recipe, pretrain
    metrics = pretrain(load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50"]))

What Megatron's `pretrain_gpt.py` and `pretrain_bert.py` do, in transformers terms: AdamW without weight decay on
biases and norm weights, linear warmup then cosine (or linear) decay to `min_learning_rate` (or constant), global
gradient-norm clipping, evaluation every `eval_interval` steps. At the end: validation loss and perplexity, a sample
(GPT: generated text; BERT: the words predicted at [MASK]), the model and tokenizer saved to `output_dir/final`
(loadable with `AutoModelForCausalLM` / `AutoModelForPreTraining.from_pretrained` after `import megahf`), the loss
curves in `output_dir/loss.png` and the numbers in `output_dir/metrics.json`; with `push_to_hub: true`, all of
it published to the Hub with a model card (`megahf.hub`, as `megahf push` does). `run_pretrain` reads as the list of
its steps; each step is a function below it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from ..atomic import atomic_write_json
from ..data.pretraining_data import build_datasets
from ..errors import alike_on_every_rank
from ..data.train_valid import TrainValidDatasets
from ..parallel.layout import ParallelLayout
from ..parallel.ranks import barrier, is_rank_zero
from ..recipe import PretrainRecipe, RecipeError, save_recipe
from .callbacks import CheckpointCallback, MegatronLogCallback
from .families import family_of
from .flops import launch_peak_tflops, training_flops_per_token
from .log import say
from .outputs import plot_losses, save_final
from .processes import prepare_processes
from .publish import check_hub_push, push_to_hub
from .resume import checkpoint_metadata, find_resume_checkpoint
from .setup import build_layout, build_model, check_recipe, load_tokenizer
from .trainer import MegatronTrainer, check_finite_weights, training_arguments


@dataclass
class PretrainResult:
    """What a run leaves behind: the trained model (in memory), its tokenizer, the Trainer, the metrics."""

    model: Any  # MegatronGPTForCausalLM or MegatronBertForPreTraining
    tokenizer: Any
    trainer: MegatronTrainer
    metrics: dict[str, Any]
    output_dir: Path


def run_pretrain(recipe: PretrainRecipe, callbacks: list[TrainerCallback] | None = None) -> PretrainResult:
    """Train as the recipe says and write the run's outputs; return the model with the metrics. Under a launcher
    (torchrun, accelerate launch) every process calls it; the recipe's layout says how they split the work.
    Extra `callbacks` are added to the Trainer's."""
    start = time.perf_counter()
    with alike_on_every_rank():  # every process reads the same recipe and launch config: printed once (megahf.cli)
        check_recipe(recipe)
        layout = build_layout(recipe)  # the world size must fit before anything is computed
        prepare_processes(layout)
    check_hub_push(recipe)  # a push that cannot happen is refused before hours of training
    set_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe)
    args = training_arguments(recipe, layout)  # starts the process group under a launcher
    if args.world_size != layout.world_size:
        raise RecipeError(f"the launcher started {args.world_size} processes but WORLD_SIZE says {layout.world_size}")
    resume_from = find_resume_checkpoint(recipe, layout)
    model = build_model(recipe, tokenizer, layout)
    data = build_datasets(recipe, tokenizer, layout, model.config)
    say(f"data: {data.describe()}")
    n_params = describe_model(recipe, model, layout)
    peak = measure_peak(recipe)
    progress = throughput_callback(recipe, layout, model.config, peak)
    trainer = build_trainer(recipe, layout, model, tokenizer, data, args, progress, callbacks)
    say_training_plan(recipe, layout, args, len(data.train), progress, peak)
    train_metrics = trainer.train_or_resume(resume_from)
    validation = validate_and_sample(trainer, recipe, model, tokenizer, len(data.valid))
    metrics = collect_metrics(recipe, layout, trainer, progress, train_metrics, validation, n_params, peak,
                              resume_from)
    output_dir = write_outputs(recipe, trainer, model, tokenizer, metrics, start)
    push_to_hub(recipe, output_dir)
    return PretrainResult(model=model, tokenizer=tokenizer, trainer=trainer, metrics=metrics, output_dir=output_dir)


# ---------------------------------------------------------------------- the steps of a run, in order


def describe_model(recipe: PretrainRecipe, model, layout: ParallelLayout) -> int:
    """Print the model's shape and the layout; return the whole model's parameter count (whatever slice of it this
    rank holds), counted on the meta device."""
    config = model.config
    with torch.device("meta"):
        n_params = sum(p.numel() for p in family_of(recipe).model_class(config).parameters())
    say(
        f"model: {recipe.model.model} ({n_params / 1e6:.2f}M parameters, {config.num_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size} padded to {config.padded_vocab_size}); {layout.describe()}"
    )
    return n_params


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s that MFU is measured against: per device, where the figure came from, over how many."""

    tflops_per_device: float
    source: str
    devices: int

    @property
    def tflops(self) -> float:
        return self.tflops_per_device * self.devices


def measure_peak(recipe: PretrainRecipe) -> Peak:
    """The peak of the launch (`flops.launch_peak_tflops`): on CPU every process measures at once, with its own
    threads, so that no rank's figure depends on what the others do while it measures."""
    return Peak(*launch_peak_tflops(recipe.run.peak_tflops))


def throughput_callback(recipe: PretrainRecipe, layout: ParallelLayout, config, peak: Peak) -> MegatronLogCallback:
    """The callback that prints the log lines and measures tokens/s and MFU."""
    gpt = family_of(recipe).name == "gpt"
    return MegatronLogCallback(
        layout.global_batch_size * recipe.data.seq_length,
        # a masked LM needs its output layer at the masked positions only (flops.py)
        flops_per_token=training_flops_per_token(config, recipe.data.seq_length,
                                                 output_fraction=1.0 if gpt else recipe.data.mask_prob),
        peak_flops=peak.tflops * 1e12,
        perplexity=gpt,
    )


def build_trainer(recipe: PretrainRecipe, layout: ParallelLayout, model, tokenizer, data: TrainValidDatasets,
                  args: TrainingArguments, progress: MegatronLogCallback,
                  callbacks: list[TrainerCallback] | None) -> MegatronTrainer:
    trainer = MegatronTrainer(
        model=model,
        args=args,
        data_collator=data.collate,
        train_dataset=data.train,
        eval_dataset=data.valid,
        processing_class=tokenizer,
        recipe=recipe,
        checkpoint_metadata=checkpoint_metadata(recipe, layout),
        progress=progress,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    if recipe.run.save_interval:
        trainer.add_callback(CheckpointCallback(recipe.run.save_interval))
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer


def say_training_plan(recipe: PretrainRecipe, layout: ParallelLayout, args: TrainingArguments, train_samples: int,
                      progress: MegatronLogCallback, peak: Peak) -> None:
    optim = recipe.optim
    samples = optim.train_steps * layout.global_batch_size
    say(
        f"training {optim.train_steps} steps x {progress.tokens_per_step:,} tokens on {args.device} "
        f"({samples / train_samples:.2f} epochs of the train split), lr {optim.learning_rate:g} "
        f"{optim.lr_schedule} -> {optim.min_learning_rate:g}, warmup {optim.warmup_steps}; MFU against "
        f"{peak.tflops:.3g} TFLOP/s ({peak.source}{f' x {peak.devices}' if peak.devices > 1 else ''})"
    )


def validate_and_sample(trainer: MegatronTrainer, recipe: PretrainRecipe, model, tokenizer,
                        valid_samples: int) -> dict[str, Any]:
    """The end-of-run validation (GPT: reusing the evaluation of the last step if Trainer just did it) and the
    sample, both printed; returns the validation numbers with `sample` added."""
    family = family_of(recipe)
    validation = family.validate(trainer)
    extra = "".join(f", {k.removeprefix('valid_').replace('_', ' ')} {v:.4f}" for k, v in validation.items()
                    if k not in ("valid_loss", "valid_ppl"))
    say(f"validation: loss {validation['valid_loss']:.4f}, {family.ppl_label} {validation['valid_ppl']:,.2f}{extra} "
        f"({valid_samples} samples)")
    sample = family.sample(model, tokenizer, recipe)  # every rank: a sharded model's forward is collective
    if sample:
        say(f"sample (sample_top_k={recipe.run.sample_top_k}, seed {recipe.run.seed}):")
        if is_rank_zero():
            print(sample, flush=True)
    return {**validation, "sample": sample}


def collect_metrics(recipe: PretrainRecipe, layout: ParallelLayout, trainer: MegatronTrainer,
                    progress: MegatronLogCallback, train_metrics: dict, validation: dict, n_params: int,
                    peak: Peak, resume_from: Path | None) -> dict[str, Any]:
    """The numbers `metrics.json` holds."""
    history = trainer.state.log_history
    train_losses = [e["loss"] for e in history if "loss" in e]
    train_seconds = progress.train_seconds or train_metrics.get("train_runtime", float("nan"))
    tokens_per_second = progress.tokens_seen / train_seconds if progress.tokens_seen else None
    extra = {k: v for k, v in validation.items() if k not in ("valid_loss", "valid_ppl", "sample")}
    return {
        "model": recipe.model.model,
        "parameters": n_params,
        "layout": layout.describe(),
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.global_step * progress.tokens_per_step,
        "epochs": trainer.state.epoch,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "valid_loss": validation["valid_loss"],
        "valid_ppl": validation["valid_ppl"],
        **extra,
        "tokens_per_second": tokens_per_second,
        "model_tflops_per_second": tokens_per_second * progress.flops_per_token / 1e12 if tokens_per_second else None,
        "peak_tflops": peak.tflops,
        "peak_source": peak.source,
        "mfu": progress.mfu(tokens_per_second),
        "train_time_s": train_metrics.get("train_runtime"),
        **peak_memory(trainer.args.device),
        "device": str(trainer.args.device),
        "resumed_from": str(resume_from) if resume_from else None,
        "sample": validation["sample"],
    }


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory so far (rank 0's, in `metrics.json`): on a GPU what torch's allocator handed out
    (`max_memory_allocated`), on CPU the process's peak resident set (which also counts the libraries' code)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_source": "torch.cuda.max_memory_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_gib": kib / 2**20, "peak_memory_source": "peak resident set size (ru_maxrss)"}


def write_outputs(recipe: PretrainRecipe, trainer: MegatronTrainer, model, tokenizer, metrics: dict,
                  start: float) -> Path:
    """`final/` (every rank: a sharded model is gathered), then on rank 0 `loss.png`, `recipe.yaml` and
    `metrics.json`, each written atomically; prints the summary."""
    family = family_of(recipe)
    output_dir = Path(recipe.run.output_dir)
    if is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
    check_finite_weights(model, "final model")
    pipeline = getattr(model, "_megahf_pipeline", None)
    final = save_final(model if pipeline is None else pipeline.gather_model(), tokenizer, output_dir)
    valid_ppl = metrics["valid_ppl"]
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        step = trainer.state.global_step
        evaluated = any(e.get("eval_loss") is not None and e["step"] == step for e in history)
        last_eval = [] if evaluated else [{"eval_loss": metrics["valid_loss"], "step": step}]
        plot_losses(history + last_eval, output_dir / "loss.png",
                    f"{recipe.model.model}: {metrics['steps']} steps, valid {family.ppl_label} {valid_ppl:,.1f}")
        save_recipe(recipe, output_dir / "recipe.yaml")
        metrics["wall_time_s"] = time.perf_counter() - start
        atomic_write_json(output_dir / "metrics.json", metrics, indent=2)
        say(f"saved {final} ({family.auto_class}.from_pretrained after `import megahf`), "
            f"{output_dir / 'loss.png'}, {output_dir / 'metrics.json'}")
    else:
        metrics["wall_time_s"] = time.perf_counter() - start
    barrier()
    mfu = f", MFU {metrics['mfu']:.1%}" if metrics["mfu"] is not None else ""
    say(f"done in {metrics['wall_time_s']:.0f}s: train loss {metrics['first_train_loss']:.3f} -> "
        f"{metrics['final_train_loss']:.3f}, valid {family.ppl_label} {valid_ppl:,.2f}, "
        f"{metrics['tokens_per_second'] or 0:,.0f} tokens/s{mfu}")
    return output_dir


def pretrain(recipe: PretrainRecipe) -> dict[str, Any]:
    """Train as the recipe says, write `final/`, `loss.png`, `metrics.json`, `recipe.yaml`; return the metrics."""
    return run_pretrain(recipe).metrics


__all__ = ["MegatronTrainer", "PretrainResult", "pretrain", "run_pretrain", "training_arguments"]
