"""Trainer callbacks: Megatron-style log lines printed above Trainer's progress bar."""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


_TRAINER_EVAL_KEYS = ("_runtime", "_samples_per_second", "_steps_per_second")


class CheckpointCallback(TrainerCallback):
    """Ask Trainer to write a checkpoint (MegatronTrainer._save_checkpoint) every `interval` steps and at the
    last step, Megatron's --save-interval; Trainer's own save strategy stays off."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0 or state.global_step == state.max_steps:
            control.should_save = True
        return control


class MegatronLogCallback(ProgressCallback):
    """Trainer's tqdm progress bar, with each log printed as one readable line instead of a dict:

        step   100/300 | loss 5.8123 | lr 9.41e-04 | grad norm 1.02 | 10,410 tokens/s | MFU 12.3%
        step   100/300 | valid loss 5.9012 | valid ppl 365.4

    `tokens_per_step` is the number of tokens in one optimizer step over all data-parallel ranks;
    `flops_per_token` the model FLOPs of training on one token, `peak_flops` the peak FLOP/s of all devices (MFU
    is left out when it is not a finite number).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float = float("nan"), peak_flops: float = float("nan"),
                 perplexity: bool = True):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.perplexity = perplexity  # exp(eval_loss) means something for a language-model loss alone
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.last_time: float | None = None
        self.last_step = 0
        # Steady-state throughput: tokens and seconds of the logged training steps after the first one (which
        # carries the start-up), evaluations excluded.
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.eval_seconds = 0.0  # evaluation time since the previous training log (Trainer's eval_runtime)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.last_time = time.perf_counter()
        self.last_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # no second progress bar for the (short) evaluations: it garbles logs that are not a terminal

    def tokens_per_second(self, state) -> float | None:
        """Throughput since the previous training log, evaluation time excluded."""
        now = time.perf_counter()
        if self.last_time is None or state.global_step <= self.last_step:
            return None
        elapsed = now - self.last_time - self.eval_seconds
        if self.last_step > 0:  # the totals leave out the first step, which carries the start-up
            self.train_seconds += elapsed
            self.tokens_seen += (state.global_step - self.last_step) * self.tokens_per_step
        rate = (state.global_step - self.last_step) * self.tokens_per_step / max(elapsed, 1e-9)
        self.last_time, self.last_step, self.eval_seconds = now, state.global_step, 0.0
        return rate

    def add_throughput(self, state, logs: dict) -> None:
        """Add `tokens_per_second` and `mfu` to a training log (before Trainer hands it to the trackers)."""
        rate = self.tokens_per_second(state)
        if rate is not None:
            logs["tokens_per_second"] = rate
            mfu = self.mfu(rate)
            if mfu is not None:
                logs["mfu"] = mfu

    def mfu(self, tokens_per_second: float | None) -> float | None:
        """Model FLOPs utilisation of a throughput, or None where the peak is unknown."""
        if not tokens_per_second:
            return None
        value = tokens_per_second * self.flops_per_token / self.peak_flops
        return value if math.isfinite(value) else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        head = f"step {state.global_step:>5}/{state.max_steps}"
        parts = []
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.3e}")
            if logs.get("grad_norm") is not None:
                parts.append(f"grad norm {float(logs['grad_norm']):.3f}")
            if "tokens_per_second" in logs:
                parts.append(f"{logs['tokens_per_second']:,.0f} tokens/s")
            if "mfu" in logs:
                parts.append(f"MFU {logs['mfu']:.2%}")
        elif "eval_loss" in logs:
            self.eval_seconds += logs.get("eval_runtime", 0.0)
            parts.append(f"valid loss {logs['eval_loss']:.4f}")
            if self.perplexity:
                parts.append(f"valid ppl {math.exp(min(logs['eval_loss'], 50.0)):,.2f}")
            # Task metrics (fine-tuning: eval_{split}_{metric}), Trainer's own timings left out.
            parts.extend(f"{key.removeprefix('eval_').replace('_', ' ')} {value:.4f}" for key, value in logs.items()
                         if key.startswith("eval_") and key != "eval_loss" and not key.endswith(_TRAINER_EVAL_KEYS)
                         and isinstance(value, (int, float)))
        else:
            return  # the end-of-training summary: reported by pretrain() itself
        line = " | ".join([head, *parts])
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


__all__ = ["CheckpointCallback", "MegatronLogCallback"]
