"""The recipe of `megahf finetune`: GLUE and RACE fine-tuning of a pretrained BERT, fully or with LoRA / QLoRA.

    task       TaskRecipe             which task, its data, the pretrained model, sequence length, epochs
    parallel   ParallelRecipe         the same layouts as pretraining (DDP, FSDP2, TP, FSDP2 x TP)
    optim      FinetuneOptimRecipe    OptimizerRecipe's keys with fine-tuning defaults, plus warmup_fraction and
                                      optim (adamw | adamw_bnb_8bit)
    peft       PeftRecipe             peft none | lora | qlora and the LoRA shape
    run        FinetuneRunRecipe      seed, evaluation and log intervals, output_dir, trackers, checkpoints and resume

The YAML file and the command line stay flat (`task: mnli`, `--lora_rank 16`), as for `megahf pretrain`. Torch-free:
the checks that need the model or the data are `megahf.training.finetune`'s (run before anything is computed).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..models.presets import PRESETS
from .errors import RecipeError, did_you_mean, need, need_at_least, need_finite
from .help import arg
from .hub import HubRecipe
from .optimizer import OptimizerRecipe
from .parallel import ParallelRecipe
from .run import REPORT_TO, CheckpointKeys, check_output_dir

# The tasks of megahf.tasks.finetuning, named here so that parsing a recipe needs neither torch nor datasets.
TASK_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "race")
PEFT_METHODS = ("none", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_bnb_8bit")
# megahf's real module names (models/layers.py): fused QKV, attention output, the MLP's two layers (a gated MLP has
# linear_fc1_gate and linear_fc1_up, hence the *).
DEFAULT_LORA_TARGETS = "linear_qkv,linear_proj,linear_fc1*,linear_fc2"
BERT_PRESETS = tuple(PRESETS.get("bert", {}))


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` that is not a local path (no leading . or /, exactly one slash, no such local folder)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
            and not os.path.exists(parts[0]))


@dataclass
class TaskRecipe:
    task: str = arg(f"The task: one of {', '.join(TASK_NAMES)}.", default="sst2")
    dataset: str | None = arg("null: the task's Hub dataset (nyu-mll/glue, ehovy/race; needs the network); else a "
                              "local folder laid out like it ({config}/{split}-00000-of-00001.parquet + README.md).",
                              default=None)
    model: str = arg("The pretrained model: a folder (a `megahf pretrain` BERT run's final/, or a transformers BERT "
                     "converted with megahf.convert.hf_bert), a peft adapter folder (its base with the adapter "
                     "merged), a Hub id, or a BERT preset (random weights: warned).",
                     default="")
    tokenizer: str | None = arg("null: the model folder's own tokenizer, else the shipped BERT WordPiece; or "
                                "'bert-uncased-embedded' or a tokenizer folder.", default=None)
    max_seq_length: int = arg("Tokens per example after truncation (GLUE 128, RACE 512 in Megatron's scripts).",
                              default=128)
    epochs: int = arg("Passes over the train split (Megatron's --epochs); gives train_steps = epochs x "
                      "(train rows // global batch) unless train_steps is set; 0 (with train_steps 0): no training, "
                      "the model's own task head scores the dev splits and predicts the test splits.", default=3)
    smoke: bool = arg("Train and evaluate on the small fixture shipped with megahf instead of `dataset` (a check "
                      "that the run works; its numbers mean nothing).", default=False)
    num_workers: int = arg("DataLoader worker processes.", default=0)

    def validate(self) -> None:
        need_at_least(self, 0, "epochs", "num_workers")
        need(self, self.max_seq_length >= 8, "max_seq_length", "it must be at least 8, e.g. 128 (GLUE) or 512 (RACE)")
        if self.task not in TASK_NAMES:
            raise RecipeError(f"unknown task task={self.task!r}{did_you_mean(self.task, TASK_NAMES)} (known tasks: "
                              f"{', '.join(TASK_NAMES)})")
        if self.dataset is not None and not self.smoke and not os.path.isdir(self.dataset):
            raise RecipeError(
                f"recipe key dataset={self.dataset!r}: no such folder; give a local folder laid out like the Hub "
                f"dataset, null for the Hub dataset (needs the network), or --smoke for the shipped fixture"
            )
        if not self.model:
            raise RecipeError(
                "recipe key model is empty: name the pretrained model to fine-tune, e.g. --model runs/bert-336m/final "
                f"(a `megahf pretrain` run's final/), or a preset ({', '.join(BERT_PRESETS)}) to start from random "
                "weights"
            )
        gpt_presets = tuple(PRESETS.get("gpt", {}))
        if self.model in gpt_presets:
            raise RecipeError(
                f"recipe key model={self.model!r} is a GPT preset: {self.task} fine-tuning needs a BERT encoder "
                f"(MegatronBert); give a pretrained BERT folder or a BERT preset ({', '.join(BERT_PRESETS)})"
            )
        if self.model not in BERT_PRESETS and not os.path.isdir(self.model) and not looks_like_hub_id(self.model):
            raise RecipeError(
                f"recipe key model={self.model!r}: no such folder; pass --model (or edit model: in the recipe) with a "
                "pretrained model folder (e.g. the final/ of a `megahf pretrain` BERT run), a Hub id (owner/name) or "
                f"a preset ({', '.join(BERT_PRESETS)})"
            )
        if self.tokenizer is not None and self.tokenizer.startswith((".", "/")) and not os.path.isdir(self.tokenizer):
            raise RecipeError(f"recipe key tokenizer={self.tokenizer!r}: no such folder; give a tokenizer folder, "
                              "'bert-uncased-embedded', or null for the model folder's own")


@dataclass
class FinetuneOptimRecipe(OptimizerRecipe):
    """OptimizerRecipe's keys with Megatron's fine-tuning defaults (linear decay to 0, weight decay 0.1, Adam beta2
    0.999), the step count derived from epochs, warmup as a fraction of it, and the optimizer's implementation."""

    train_steps: int = arg("Optimizer steps; 0: epochs x (train rows // global batch), as Megatron's finetune.",
                           default=0)
    learning_rate: float = arg("Peak learning rate after warmup.", default=2e-5)
    min_learning_rate: float = arg("Floor the schedule decays to (Megatron's fine-tuning: 0).", default=0.0)
    warmup_steps: int = arg("Linear warmup steps (wins over warmup_fraction); 0: warmup_fraction of train_steps.",
                            default=0)
    lr_schedule: str = arg("Decay after warmup: cosine, linear or constant.", default="linear")
    adam_beta2: float = arg("AdamW beta2.", default=0.999)
    warmup_fraction: float = arg("Warmup as a fraction of train_steps when warmup_steps is 0 (Megatron's "
                                 "--lr-warmup-fraction; its GLUE scripts use 0.065).", default=0.065)
    optim: str = arg(f"The optimizer: {' | '.join(OPTIMIZERS)} (bitsandbytes' 8-bit AdamW: optimizer state in "
                     "8 bits).", default="adamw")

    def validate(self) -> None:
        # OptimizerRecipe's checks need a step count: probe them with one that train_steps=0 (derived) stands for.
        probe_steps = self.train_steps or self.warmup_steps + 1
        OptimizerRecipe.validate(dataclasses.replace(self, train_steps=probe_steps))
        need_at_least(self, 0, "train_steps")
        need(self, 0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", "it must lie in [0, 1), e.g. 0.065")
        need(self, self.optim in OPTIMIZERS, "optim", f"use one of {', '.join(OPTIMIZERS)}")


@dataclass
class PeftRecipe:
    peft: str = arg("none: train every weight; lora: LoRA adapters (peft) on lora_target_modules, the task head "
                    "trained fully; qlora: the same on a 4-bit nf4 base (bitsandbytes).", default="none")
    lora_rank: int = arg("LoRA rank r.", default=8)
    lora_alpha: float = arg("LoRA alpha (the update is scaled by alpha / r).", default=16.0)
    lora_dropout: float = arg("Dropout on the LoRA branch.", default=0.1)
    lora_target_modules: str = arg("Comma-separated module names LoRA adapts (* matches within a name).",
                                   default=DEFAULT_LORA_TARGETS)

    @property
    def target_names(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def validate(self) -> None:
        need_finite(self)
        need(self, self.peft in PEFT_METHODS, "peft", f"use one of {', '.join(PEFT_METHODS)}")
        need_at_least(self, 1, "lora_rank")
        need(self, self.lora_alpha > 0, "lora_alpha", "it must be positive, e.g. 16")
        need(self, 0.0 <= self.lora_dropout < 1.0, "lora_dropout", "it must lie in [0, 1), e.g. 0.1")
        need(self, bool(self.target_names), "lora_target_modules", f"name at least one module, e.g. "
             f"{DEFAULT_LORA_TARGETS}")


@dataclass
class FinetuneRunRecipe(CheckpointKeys):
    seed: int = arg("Seed of the task head's init, the data order and dropout.", default=1234)
    eval_interval: int = arg("Evaluate on the dev split(s) every this many steps (0: only at the end; the shipped "
                             "recipes use about one epoch).", default=0)
    log_interval: int = arg("Print a log line every this many steps.", default=10)
    output_dir: str = arg("Folder for final/, results.json, results.md, predictions/, loss.png, recipe.yaml and "
                          "checkpoints/.",
                          default="runs/finetune")
    report_to: str = arg(f"Experiment tracker for Trainer: one of {', '.join(REPORT_TO)}.", default="none")

    @property
    def trackers(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",")]

    def validate(self) -> None:
        need_finite(self)
        need_at_least(self, 1, "log_interval")
        need_at_least(self, 0, "eval_interval", "seed")
        self.check_checkpoint_keys()
        need(self, self.output_dir != "", "output_dir", "name a folder, e.g. runs/finetune-mnli")
        check_output_dir(self.output_dir)
        need(self, all(r in REPORT_TO for r in self.trackers), "report_to", f"use one of {', '.join(REPORT_TO)}")


@dataclass
class FinetuneRecipe:
    """Everything one fine-tuning run needs. Key names follow Megatron-LM's finetune arguments where one exists
    (`--task`, `--epochs`, `--lr`, `--lr-warmup-fraction`, `--micro-batch-size`, `--seq-length`)."""

    task: TaskRecipe = field(default_factory=TaskRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    optim: FinetuneOptimRecipe = field(default_factory=FinetuneOptimRecipe)
    peft: PeftRecipe = field(default_factory=PeftRecipe)
    run: FinetuneRunRecipe = field(default_factory=FinetuneRunRecipe)
    hub: HubRecipe = field(default_factory=HubRecipe)

    def validate(self) -> None:
        for section in self.sections():
            section.validate()
        if self.parallel.sequence_parallel:
            # Its batches are padded to their longest example, a length the tensor-parallel ranks need not divide.
            raise RecipeError(
                "recipe key sequence_parallel=True: megahf finetune does not split sequences (a batch is padded to its "
                "longest example, which the tensor-parallel ranks need not divide); set sequence_parallel: false "
                "(tensor_parallel_size alone still shards the model)"
            )
        if self.parallel.pipeline_parallel_size > 1:
            raise RecipeError(
                f"recipe key pipeline_parallel_size={self.parallel.pipeline_parallel_size}: megahf finetune does not "
                "pipeline (a fine-tuned model is small next to the one it was pretrained as); set "
                "pipeline_parallel_size: 1 and use tensor_parallel_size and fsdp_size. A pipelined pretraining run's "
                "final/ folder is an ordinary model folder that fine-tuning takes as model"
            )
        tp = self.parallel.tensor_parallel_size
        if self.optim.optim == "adamw_bnb_8bit" and (tp > 1 or self.parallel.fsdp_size > 1):
            key = "tensor_parallel_size" if tp > 1 else "fsdp_size"
            raise RecipeError(
                f"recipe key optim='adamw_bnb_8bit' with {key}={getattr(self.parallel, key)}: bitsandbytes' 8-bit "
                "AdamW updates plain tensors and has no rule for the DTensor shards of tensor parallelism or FSDP2; "
                "use optim: adamw there, or adamw_bnb_8bit on one process or under data parallelism (DDP)"
            )
        if self.peft.peft == "qlora" and tp > 1:
            raise RecipeError(
                f"recipe key peft='qlora' with tensor_parallel_size={tp}: bitsandbytes packs each 4-bit matrix whole "
                "(codes and block scales run over the flattened weight), so its rows and columns cannot be split "
                "over tensor-parallel ranks; use fsdp_size to shard QLoRA's 4-bit storage, or peft: lora with "
                "tensor_parallel_size"
            )
        if self.peft.peft == "lora" and tp > 1 and self.peft.lora_dropout > 0:
            raise RecipeError(
                f"recipe key lora_dropout={self.peft.lora_dropout} with tensor_parallel_size={tp}: inside the "
                "attention block every tensor-parallel rank draws its own dropout mask, so the ranks would drop "
                "different features of the input they share and their adapter gradients would disagree; set "
                "lora_dropout: 0"
            )

    def sections(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a recipe file holds."""
        return {key: value for section in self.sections() for key, value in asdict(section).items()}


__all__ = ["BERT_PRESETS", "DEFAULT_LORA_TARGETS", "FinetuneOptimRecipe", "FinetuneRecipe", "FinetuneRunRecipe",
           "OPTIMIZERS", "PEFT_METHODS", "PeftRecipe", "TASK_NAMES", "TaskRecipe", "looks_like_hub_id"]
