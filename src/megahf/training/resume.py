"""Which checkpoint a run resumes from (`resume: auto|none|PATH`), and the refusal of one that does not fit the
recipe and launch."""

from __future__ import annotations

from pathlib import Path

from ..parallel.layout import ParallelLayout
from ..parallel.ranks import broadcast_from_rank_zero, is_rank_zero
from ..recipe import PretrainRecipe, RecipeError
from . import checkpoint as ckpt


def checkpoint_metadata(recipe: PretrainRecipe, layout: ParallelLayout) -> dict:
    """What a resume must agree with (the data position is global_step x global batch of seq_length samples)."""
    return {"global_batch_size": layout.global_batch_size, "seq_length": recipe.data.seq_length,
            "seed": recipe.run.seed, "world_size": layout.world_size,
            "tensor_parallel_size": layout.tensor_parallel_size, "fsdp_size": layout.fsdp_size,
            "train_steps": recipe.optim.train_steps}


def find_resume_checkpoint(recipe: PretrainRecipe, layout: ParallelLayout) -> Path | None:
    """The checkpoint to resume from (`resume: auto|none|PATH`), checked against the recipe before anything is
    built. Rank 0 decides and tells the others, so that all ranks load the same one."""
    path: Path | None = None
    if recipe.run.resume == "auto":
        if is_rank_zero():
            path = ckpt.latest_checkpoint(Path(recipe.run.output_dir) / "checkpoints")
        path = broadcast_from_rank_zero(path)
    elif recipe.run.resume != "none":
        path = Path(recipe.run.resume)
        problem = ckpt.checkpoint_problem(path)
        if problem:
            raise RecipeError(f"recipe key resume={recipe.run.resume!r}: that checkpoint is unusable ({problem}); "
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


__all__ = ["checkpoint_metadata", "find_resume_checkpoint"]
