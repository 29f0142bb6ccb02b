"""Everything about a run that is not the model, the data, the layout or the optimizer: seed, evaluation, logging,
the sample at the end, outputs, checkpoints and resume."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import RecipeError, need, need_at_least, need_finite
from .help import arg

REPORT_TO = ("none", "tensorboard", "all")
RESUME_MODES = ("auto", "none")


@dataclass
class CheckpointKeys:
    """The checkpoint keys every training verb shares (`megahf pretrain`, `megahf finetune`)."""

    save_interval: int = arg("Write a resumable checkpoint to output_dir/checkpoints/ every this many steps "
                             "(0: none; Megatron's --save-interval).", default=0)
    async_save: bool = arg("Write each checkpoint in the background while training continues (DCP's async save; "
                           "the marker is written, and the checkpoint published, once every rank's write finished).",
                           default=False)
    keep_last: int = arg("Complete checkpoints kept; older ones are deleted once a newer one is complete.",
                         default=2)
    resume: str = arg("'auto': continue from the newest complete checkpoint in output_dir/checkpoints if there "
                      "is one (running the same command again resumes); 'none': start afresh; or a checkpoint "
                      "folder.", default="auto")

    def check_checkpoint_keys(self) -> None:
        need_at_least(self, 1, "keep_last")
        need_at_least(self, 0, "save_interval")
        need(self, self.resume in RESUME_MODES or os.path.isdir(self.resume), "resume",
             "use 'auto', 'none' or an existing checkpoint folder (output_dir/checkpoints/step_NNNNNNN)")


@dataclass
class RunRecipe(CheckpointKeys):
    seed: int = arg("Seed of the model init, the data split and order, dropout and sampling.", default=1234)
    eval_interval: int = arg("Evaluate on the validation split every this many steps (0: only at the end).",
                             default=100)
    eval_iters: int = arg("Validation batches per evaluation (Megatron's --eval-iters) for GPT data_path and "
                          "BERT data.", default=10)
    log_interval: int = arg("Print a log line every this many steps.", default=10)
    output_dir: str = arg("Folder for final/ (the model), metrics.json, loss.png, recipe.yaml.",
                          default="runs/gpt-tiny")
    sample_prompt: str = arg("Prompt of the sample generated at the end ('' starts from EOD).", default="ROMEO:")
    sample_tokens: int = arg("Tokens generated for the sample (0: no sample).", default=64)
    sample_top_k: int = arg("Top-k sampling for the sample, seeded (0: greedy).", default=40)
    report_to: str = arg(f"Experiment tracker for Trainer: one of {', '.join(REPORT_TO)}.", default="none")
    peak_tflops: float = arg("Peak TFLOP/s of one device for the MFU figure (0: a known GPU's bf16 dense peak, "
                             "or on CPU this machine's fp32 matmul rate measured at start-up).", default=0.0)

    @property
    def trackers(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",")]

    def validate(self) -> None:
        need_finite(self)
        need_at_least(self, 1, "log_interval", "eval_iters")
        need_at_least(self, 0, "eval_interval", "sample_tokens", "sample_top_k", "seed")
        need(self, self.peak_tflops >= 0, "peak_tflops",
             "it must be 0 (auto) or the device's peak in TFLOP/s, e.g. 989 for an H100's bf16")
        self.check_checkpoint_keys()
        need(self, self.output_dir != "", "output_dir", "name a folder, e.g. runs/gpt-tiny")
        check_output_dir(self.output_dir)
        need(self, all(r in REPORT_TO for r in self.trackers), "report_to", f"use one of {', '.join(REPORT_TO)}")


def check_output_dir(output_dir: str) -> None:
    """Refuse, before anything is computed, an output_dir that names a file, lies under a file, or would be created
    in (or is) a folder this process cannot write to: the run would otherwise fail only when it saves."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RecipeError(
            f"recipe key output_dir={output_dir!r} names an existing file, not a folder; name a folder (it is created "
            "if missing), e.g. runs/gpt-tiny, or move the file away"
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RecipeError(
            f"recipe key output_dir={output_dir!r} cannot be created: {existing} is a file, not a folder; name a "
            "folder whose parents are folders, e.g. runs/gpt-tiny"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(
            f"recipe key output_dir={output_dir!r} cannot be written: {existing} is not writable by this user; "
            "choose a folder you can write to, e.g. runs/gpt-tiny, or change its permissions"
        )


__all__ = ["CheckpointKeys", "REPORT_TO", "RESUME_MODES", "RunRecipe", "check_output_dir"]
