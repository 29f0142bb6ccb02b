"""`MegatronTrainer`: transformers' Trainer with Megatron's choices where Trainer's defaults differ (decay groups, the
linear schedule to a floor, clipping across meshes) and megahf's checkpoints; and the `TrainingArguments` a recipe
gives."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from ..errors import MegahfError
from ..parallel import clip_grad_norm_
from ..parallel.layout import ParallelLayout
from ..parallel.pipeline import shard_data_like_pipeline
from ..recipe import FinetuneRecipe, PretrainRecipe
from . import checkpoint as ckpt
from .callbacks import MegatronLogCallback
from .log import say
from .resume import derived_seed, same_layout
from .setup import build_layout


class NonFiniteError(MegahfError, RuntimeError):
    """A loss or a weight is NaN or infinite: the run stops, and nothing non-finite is written."""


class MegatronTrainer(Trainer):
    """Trainer with Megatron's choices where Trainer's defaults differ, and megahf's checkpoints (one format for
    every layout, tensor parallel included, which Trainer's own cannot resume). `recipe` is a pretraining or a
    fine-tuning recipe: it reads `recipe.optim` (the schedule) and, for checkpoints, `recipe.run.keep_last`."""

    def __init__(self, *args, recipe: PretrainRecipe | FinetuneRecipe, checkpoint_metadata: dict | None = None,
                 progress: MegatronLogCallback | None = None, **kwargs):
        self.recipe = recipe
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.progress = progress
        super().__init__(*args, **kwargs)
        self.pipeline = getattr(self.model, "_megahf_pipeline", None)
        if self.pipeline is not None:
            shard_data_like_pipeline(self.accelerator, self.pipeline)
        parallel = recipe.parallel
        if isinstance(recipe, PretrainRecipe) and parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1:
            self.gather_function = self._gather_once_per_batch

    def _gather_once_per_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """accelerate's `gather_for_metrics` for a layout whose ranks share batches: the tensor-parallel ranks and the
        pipeline stages of a data-parallel rank hold the same values, which a gather over every process would count
        tp x pp times, wrongly for a short last batch (cut to the batch's real rows from the front). One copy per
        data-parallel rank, then the cut."""
        tp, pp = self.recipe.parallel.tensor_parallel_size, self.recipe.parallel.pipeline_parallel_size
        gathered = self.accelerator.gather(tensor.contiguous())
        per_rank = gathered.reshape(self.accelerator.num_processes, -1, *tensor.shape[1:])
        # ranks are numbered pipeline stage outermost, tensor-parallel rank innermost
        tensor = per_rank[: self.accelerator.num_processes // pp : tp].reshape(-1, *tensor.shape[1:])
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            tensor = tensor[: state.remainder]
        return tensor

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            # Trainer closes its progress bar only when training ends well; left open, tqdm redraws it when it is
            # collected, after the CLI's one-line error, which is then no longer the last line a user sees
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                    callback.training_bar.close()
                    callback.training_bar = None
            raise

    def train_or_resume(self, resume_from: Path | None) -> dict:
        """Run the training loop, resumed from the checkpoint `resume_from` if given; Trainer's train metrics."""
        if resume_from is not None and ckpt.read_metadata(resume_from)["step"] >= self.recipe.optim.train_steps:
            # Trainer would run one more step past max_steps (it checks for the end after a step): load the trained
            # model and its history instead, as Megatron does when iteration >= train_iters.
            say(f"{resume_from} has finished training: evaluating and saving it")
            ckpt.load_model(resume_from, self.model)
            self.state = TrainerState.load_from_json(str(Path(resume_from) / ckpt.TRAINER_STATE))
            return {}
        if resume_from is not None:
            say(f"resuming from {resume_from}")
        metrics = self.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
        self.finish_pending_checkpoint(wait=True)  # async_save: the last checkpoint is complete before the end
        return metrics

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.pipeline is not None:  # every micro-batch of the step, forward and backward, through the stages
            model.train()
            loss = self.pipeline.train_step(self._prepare_inputs(inputs))
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        check_finite_loss(loss, self.state.global_step + 1)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.pipeline is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        model.eval()
        return self.pipeline.eval_loss(self._prepare_inputs(inputs)), None, None

    def _sync_replicated_trainable_parameters(self, model) -> None:
        if self.pipeline is None:  # a pipeline's stages hold different parameters and reduce their own gradients
            super()._sync_replicated_trainable_parameters(model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.progress is not None and "loss" in logs:
            self.progress.add_throughput(self.state, logs)  # into log_history and every tracker
        super().log(logs, start_time)

    # ---- gradient clipping across meshes (TP-only, FSDP2 and TP x FSDP2 parameters side by side)

    def _clip_grad_norm(self, model):
        if self.pipeline is not None:
            return self.pipeline.clip_grad_norm_(self.args.max_grad_norm)
        if self.is_distributed_loading_by_transformers:
            return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    # ---- checkpoints (written when CheckpointCallback asks; read by Trainer's resume path)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def _save_checkpoint(self, model, trial) -> None:
        check_finite_weights(self.model, f"checkpoint of step {self.state.global_step}")
        self.finish_pending_checkpoint(wait=True)  # one background write at a time
        saved = ckpt.save_checkpoint(
            Path(self.args.output_dir) / "checkpoints", self.state.global_step, self.model, self._torch_optimizer(),
            self.lr_scheduler, self.state, self.checkpoint_metadata, keep_last=self.recipe.run.keep_last,
            async_save=self.recipe.run.async_save,
        )
        if isinstance(saved, ckpt.PendingCheckpoint):
            self._pending_checkpoint = saved
            say(f"checkpoint of step {saved.step}: writing in the background")
        else:
            say(f"checkpoint {saved}")

    def finish_pending_checkpoint(self, wait: bool) -> None:
        """Publish the checkpoint being written in the background once every rank's write has finished (collective;
        `wait=False` polls, as after every step)."""
        pending = getattr(self, "_pending_checkpoint", None)
        if pending is None:
            return
        path = ckpt.finish_checkpoint(pending, wait=wait)
        if path is not None:
            self._pending_checkpoint = None
            say(f"checkpoint {path}")

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        self.finish_pending_checkpoint(wait=False)  # every rank, after every step
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        ckpt.load_model(resume_from_checkpoint, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            same = same_layout(ckpt.read_metadata(checkpoint), self.checkpoint_metadata)
            ckpt.load_optimizer(checkpoint, self.model, self._torch_optimizer(), same_layout=same)
            ckpt.load_scheduler(checkpoint, self.lr_scheduler)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The random streams of each rank as they were, on the layout the checkpoint was written with; on another
        layout no rank's stream has a counterpart: every rank re-seeds from the seed and the step (resume.py)."""
        if checkpoint is None:
            return
        saved = ckpt.read_metadata(checkpoint)
        if same_layout(saved, self.checkpoint_metadata):
            ckpt.load_rng(checkpoint)
        else:
            set_seed(derived_seed(self.recipe.run.seed, saved["step"]))

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # Megatron decays every weight matrix and embedding, never a bias or a 1-D parameter (norm weights). Trainer's
        # default goes by module type and by name patterns; this rule does not depend on how a module is named.
        return [name for name, param in model.named_parameters() if param.ndim > 1 and not name.endswith(".bias")]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # transformers' "linear" decays to 0; Megatron's linear style decays to min_lr.
        if self.lr_scheduler is None and self.recipe.optim.lr_schedule == "linear":
            optim = self.recipe.optim
            warmup, peak, floor = optim.warmup_steps, optim.learning_rate, optim.min_learning_rate

            def factor(step: int) -> float:
                if step < warmup:
                    return step / warmup
                progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
                return (floor + (peak - floor) * (1.0 - progress)) / peak

            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return super().create_scheduler(num_training_steps, optimizer)


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """Megatron's check for NaN in the loss, on every micro-batch, before the optimizer step that would spread it into
    the weights: every rank learns whether any rank's loss is not finite (they hold different data under data
    parallelism) and all stop together, so no checkpoint and no final model of a non-finite run is ever written."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteError(
            f"step {step}: the training loss is {loss.detach().float().item()} (not finite on at least one rank); the "
            "run stopped before this step's optimizer update and wrote nothing for it. Lower learning_rate, check "
            "the data and the recipe's optimizer values, then run the same command again to resume from the last "
            "checkpoint."
        )


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse to write `what` from weights that are not all finite (checked on every rank's shards). Only the trained
    weights are checked: a frozen one is as it was loaded, and QLoRA's frozen base holds packed 4-bit codes in a float
    dtype, whose bytes need not read as finite floats."""
    bad_names = [name for name, p in model.named_parameters() if p.requires_grad
                 and not torch.isfinite((p.to_local() if isinstance(p, DTensor) else p).detach()).all()]
    bad = torch.tensor([int(bool(bad_names))], dtype=torch.int32, device=next(model.parameters()).device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        where = ", ".join(bad_names[:3]) if bad_names else "on another rank"
        raise NonFiniteError(f"not writing the {what}: some weights are not finite ({where}).")


def training_arguments(recipe: PretrainRecipe, layout: ParallelLayout | None = None) -> TrainingArguments:
    """The `TrainingArguments` of a pretraining recipe."""
    return trainer_arguments(recipe.optim, recipe.parallel, recipe.run, layout or build_layout(recipe, 1),
                             num_workers=recipe.data.num_workers)


def trainer_arguments(optimizer, parallel, run, layout: ParallelLayout, *, num_workers: int = 0,
                      **changes) -> TrainingArguments:
    """`TrainingArguments` from the recipe sections every training verb shares (an `OptimizerRecipe`, a
    `ParallelRecipe`, a run section with seed, intervals, output_dir and trackers); `changes` replace single
    arguments (e.g. `optim="adamw_bnb_8bit"` for fine-tuning)."""
    on_gpu = torch.cuda.is_available()
    schedule = {
        "cosine": ("cosine_with_min_lr", {"min_lr": optimizer.min_learning_rate}),
        "linear": ("linear", {}),  # replaced by MegatronTrainer.create_scheduler (decay to min_lr)
        "constant": ("constant_with_warmup", {}),
    }[optimizer.lr_schedule]
    # a pipeline takes all the micro-batches of a step at once and splits them itself
    at_once = layout.gradient_accumulation_steps if layout.pipelined else 1
    arguments = dict(
        output_dir=run.output_dir,
        max_steps=optimizer.train_steps,
        per_device_train_batch_size=parallel.micro_batch_size * at_once,
        per_device_eval_batch_size=parallel.micro_batch_size * at_once,
        gradient_accumulation_steps=layout.gradient_accumulation_steps // at_once,
        learning_rate=optimizer.learning_rate,
        lr_scheduler_type=schedule[0],
        lr_scheduler_kwargs=schedule[1],
        warmup_steps=optimizer.warmup_steps,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_epsilon=optimizer.adam_eps,
        optim="adamw_torch_fused",  # one fused kernel per step (CPU and GPU); several times faster than the loop
        max_grad_norm=optimizer.clip_grad,  # 0 turns clipping off
        logging_strategy="steps",
        logging_steps=run.log_interval,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run (check_finite_loss); never hide one in logs
        eval_strategy="steps" if run.eval_interval > 0 else "no",
        eval_steps=run.eval_interval if run.eval_interval > 0 else None,
        prediction_loss_only=True,  # never keep b x s x vocab logits of the whole validation split
        save_strategy="no",  # checkpoints are megahf's (CheckpointCallback); the final save is the verb's
        report_to=run.trackers,
        seed=run.seed,
        data_seed=run.seed,
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=on_gpu,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=False,  # recompute: full is enabled on the model (setup.build_model)
        disable_tqdm=False,
    )
    return TrainingArguments(**{**arguments, **changes})


__all__ = ["MegatronTrainer", "NonFiniteError", "check_finite_loss", "trainer_arguments", "training_arguments"]
