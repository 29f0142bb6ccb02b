"""Which checkpoint a run resumes from (`resume: auto|none|PATH`), and the refusal of one that does not fit the
recipe and launch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..parallel.layout import ParallelLayout
from ..parallel.ranks import broadcast_from_rank_zero, is_rank_zero
from ..recipe import PretrainRecipe, RecipeError
from . import checkpoint as ckpt
from .setup import build_config

# Config fields that change how the model runs, not what its weights are or what it computes.
_RUNTIME_CONFIG_FIELDS = frozenset({"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype",
                                    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
                                    "loss_chunk_size"})


def model_config_fields(recipe: PretrainRecipe) -> dict:
    """The recipe's model config as JSON values (what the marker stores), without the runtime-only fields."""
    config = build_config(recipe.model).to_dict()
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _RUNTIME_CONFIG_FIELDS}))


def checkpoint_metadata(recipe: PretrainRecipe, layout: ParallelLayout) -> dict:
    """What a resume must agree with (the data position is global_step x global batch of seq_length samples; the
    weights are the model config's)."""
    return {"global_batch_size": layout.global_batch_size, "seq_length": recipe.data.seq_length,
            "seed": recipe.run.seed, "world_size": layout.world_size,
            "tensor_parallel_size": layout.tensor_parallel_size, "fsdp_size": layout.fsdp_size,
            "train_steps": recipe.optim.train_steps, "model_config": model_config_fields(recipe)}


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
    if saved.get("format") == 1:
        warnings.warn(f"checkpoint {path} was written by an older megahf (marker format 1): its files' sizes are "
                      "checked but not their contents (no checksums), and a changed model config is not detected "
                      "before loading; its pickles are read the safe way as always", stacklevel=2)
    else:
        _refuse_changed_model(path, saved["model_config"], now["model_config"])
    return path


def _refuse_changed_model(path: Path, saved: dict, now: dict) -> None:
    """A checkpoint's weights only fit the model config they were trained with: name every field that differs.
    A field only one side knows (added to the config by a later megahf) is left alone."""
    changed = sorted(key for key in saved.keys() & now.keys()
                     if key not in _RUNTIME_CONFIG_FIELDS and saved[key] != now[key])
    if not changed:
        return
    was = ", ".join(f"{key}={saved[key]!r}" for key in changed)
    given = ", ".join(f"{key}={now[key]!r}" for key in changed)
    fix = " and ".join(f"model_overrides.{key} to {saved[key]!r}" for key in changed)
    raise RecipeError(
        f"checkpoint {path} was written with the model field {was}, the recipe now gives {given}: the checkpoint's "
        f"weights would not fit the model; set {fix}, or resume: none (or another output_dir) to start afresh"
    )


__all__ = ["checkpoint_metadata", "find_resume_checkpoint", "model_config_fields"]
