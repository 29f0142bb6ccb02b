"""What a run leaves in `output_dir` besides checkpoints: `final/` (a Hugging Face model folder) and `loss.png`,
each written so that it is complete or absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
from matplotlib import pyplot as plt

from ..atomic import atomic_write, publish_folder, temporary_name
from ..errors import explain_write_errors
from ..parallel.ranks import barrier, is_rank_zero

matplotlib.use("Agg")  # files only, never a window


def save_final(model, tokenizer, output_dir: Path, state_dict: dict | None = None) -> Path:
    """Write `output_dir/final` so that it is either the complete new checkpoint or not there at all. Called on
    every rank: a sharded model is gathered, rank 0 writes (`state_dict`: what to write instead of the model's own,
    gathered already; a peft model under FSDP2 or tensor parallelism needs it). `model` is None on the ranks that
    hold no part of what is written (a pipeline assembles the whole model on rank 0)."""
    final = output_dir / "final"
    partial = Path(temporary_name(final, per_process=False))
    if is_rank_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while saving
    barrier()
    intact = f"the previous {final} is intact" if final.exists() else f"no {final} was written"
    # A full disk or an unwritable folder: one clear error naming final/, and no half-written folder left behind.
    with explain_write_errors(final, intact=f"{intact} (the partial copy is removed)",
                              elsewhere="choose another output_dir"):
        try:
            if model is not None:
                model.save_pretrained(partial, is_main_process=is_rank_zero(),
                                      **({} if state_dict is None else {"state_dict": state_dict}))
            # every rank's save_pretrained lists partial/: rank 0 renames it only once all are done (a loaded
            # machine let rank 1 list a folder that rank 0 had already published)
            barrier()
            if is_rank_zero():
                tokenizer.save_pretrained(partial)
                publish_folder(partial, final)
        except BaseException:
            if is_rank_zero():
                shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


def plot_losses(log_history: list[dict], path: Path, title: str,
                ylabel: str = "cross entropy (nats/token)") -> None:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


__all__ = ["plot_losses", "save_final"]
