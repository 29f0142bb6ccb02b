"""The optimizer and the learning-rate schedule: AdamW, warmup then decay, clipping, and how many steps."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import need, need_at_least, need_finite
from .help import arg

LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimizerRecipe:
    train_steps: int = arg("Optimizer steps (Megatron's --train-iters).", default=300)
    learning_rate: float = arg("Peak learning rate after warmup.", default=1e-3)
    min_learning_rate: float = arg("Floor the schedule decays to (cosine and linear).", default=1e-4)
    warmup_steps: int = arg("Linear warmup from 0 to learning_rate over this many steps.", default=30)
    lr_schedule: str = arg(f"Decay after warmup: one of {', '.join(LR_SCHEDULES)}.", default="cosine")
    weight_decay: float = arg("AdamW weight decay (not applied to biases and norm weights).", default=0.1)
    adam_beta1: float = arg("AdamW beta1.", default=0.9)
    adam_beta2: float = arg("AdamW beta2.", default=0.95)
    adam_eps: float = arg("AdamW epsilon.", default=1e-8)
    clip_grad: float = arg("Clip the global gradient norm to this (0 turns clipping off).", default=1.0)

    def validate(self) -> None:
        """Every value finite and in its range, before anything is built: an infinite epsilon or weight decay, a
        beta of 1 or a nan learning rate would train without an error and learn nothing."""
        need_finite(self)
        need_at_least(self, 1, "train_steps")
        need_at_least(self, 0, "warmup_steps")
        need(self, self.warmup_steps < self.train_steps, "warmup_steps",
             f"it must be smaller than train_steps={self.train_steps}")
        need(self, self.learning_rate > 0, "learning_rate", "it must be positive, e.g. 1e-3")
        need(self, 0.0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate",
             f"it must lie in [0, learning_rate={self.learning_rate}]")
        need(self, self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"use one of {', '.join(LR_SCHEDULES)}")
        need(self, self.weight_decay >= 0.0, "weight_decay", "it must be 0 (off) or positive, e.g. 0.1")
        for key in ("adam_beta1", "adam_beta2"):
            need(self, 0.0 <= getattr(self, key) < 1.0, key, "it must lie in [0, 1), e.g. 0.9")
        need(self, 0.0 < self.adam_eps < 1.0, "adam_eps", "it must lie strictly between 0 and 1, e.g. 1e-8")
        need(self, self.clip_grad >= 0.0, "clip_grad", "it must be 0 (off) or positive, e.g. 1.0")


__all__ = ["LR_SCHEDULES", "OptimizerRecipe"]
