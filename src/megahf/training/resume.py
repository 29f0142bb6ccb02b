"""Which checkpoint a run resumes from (`resume: auto|none|PATH`), and the refusal of one that does not fit the
recipe (pretraining here; fine-tuning's marker values are `finetune_setup.py`'s).

A checkpoint resumes on any parallel layout (tensor parallel, FSDP, data parallel, other process counts): the model
and optimizer state are resharded by torch.distributed.checkpoint into the new layout's sharded state dict, the data
position is the consumed samples (global step x global batch, replayed by the seeded sampler whatever the layout),
the scheduler and the step are layout-free. What cannot carry over is each rank's random stream (dropout): after a
change of layout every rank re-seeds from the recipe's seed and the step (`derived_seed`). Refused, each with its
reason: another global batch, sequence length or seed (the data position would not match), another model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..parallel.layout import ParallelLayout
from ..parallel.ranks import broadcast_from_rank_zero, is_rank_zero
from ..recipe import PretrainRecipe, RecipeError
from . import checkpoint as ckpt
from .log import say
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
            "pipeline_parallel_size": layout.pipeline_parallel_size,
            "virtual_pipeline_size": layout.virtual_pipeline_size,
            "train_steps": recipe.optim.train_steps, "model_config": model_config_fields(recipe)}


# Why a checkpoint written with another value of a recipe key cannot continue this run (the data position is the
# consumed samples: global step x global batch, in the seeded order).
GLOBAL_BATCH_REASON = "the data position (consumed samples = step x global batch) would not match"
SEED_REASON = "the data order and split follow the seed, so the data position would not match"
PRETRAIN_REASONS = {"global_batch_size": GLOBAL_BATCH_REASON,
                    "seq_length": "the data position (samples of seq_length + 1 tokens) would not match",
                    "seed": SEED_REASON}


def find_resume_checkpoint(recipe: PretrainRecipe, layout: ParallelLayout) -> Path | None:
    """The checkpoint a pretraining run resumes from (`resume: auto|none|PATH`), checked against the recipe."""
    return resume_checkpoint(recipe.run, checkpoint_metadata(recipe, layout), PRETRAIN_REASONS)


def resume_checkpoint(run, now: dict, reasons: dict[str, str]) -> Path | None:
    """The checkpoint to resume from (`run.resume`: auto|none|PATH), checked before anything is built against the
    run's marker values `now`: a key of `reasons` (a recipe key) that differs is refused with its reason, and so is a
    changed `model_config`. Rank 0 decides and tells the others, so that all ranks load the same one."""
    path: Path | None = None
    if run.resume == "auto":
        if is_rank_zero():
            path = ckpt.latest_checkpoint(Path(run.output_dir) / "checkpoints")
        path = broadcast_from_rank_zero(path)
    elif run.resume != "none":
        path = Path(run.resume)
        problem = ckpt.checkpoint_problem(path)
        if problem:
            raise RecipeError(f"recipe key resume={run.resume!r}: that checkpoint is unusable ({problem}); "
                              "name a complete one, or use resume: auto")
    if path is None:
        return None
    saved = ckpt.read_metadata(path)
    for key, reason in reasons.items():
        if saved.get(key) != now[key]:
            raise RecipeError(
                f"checkpoint {path} was written with {key}={saved.get(key)}, the recipe and launch now give "
                f"{now[key]}: {reason}; set {key} to {saved.get(key)}, or resume: none (or another output_dir) to "
                "start afresh"
            )
    if not same_layout(saved, now):
        say(f"resuming {path} written at {describe_layout(saved)} on {describe_layout(now)}: model and optimizer "
            f"resharded, data position step {saved.get('step')} x global batch {now['global_batch_size']}, random "
            f"streams re-seeded from seed {now['seed']} and the step")
    if saved.get("format") == 1:
        warnings.warn(f"checkpoint {path} was written by an older megahf (marker format 1): its files' sizes are "
                      "checked but not their contents (no checksums), and a changed model config is not detected "
                      "before loading; its pickles are read the safe way as always", stacklevel=2)
    elif "model_config" in now:
        _refuse_changed_model(path, saved["model_config"], now["model_config"])
    return path


LAYOUT_KEYS = ("world_size", "tensor_parallel_size", "fsdp_size", "pipeline_parallel_size", "virtual_pipeline_size")
_BEFORE_PIPELINES = {"pipeline_parallel_size": 1, "virtual_pipeline_size": 1}  # a marker written without them


def same_layout(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's layout (its marker) is the run's: only then can each rank's RNG state be restored."""
    return all(saved.get(key, _BEFORE_PIPELINES.get(key)) == now.get(key, _BEFORE_PIPELINES.get(key))
               for key in LAYOUT_KEYS)


def describe_layout(meta: dict) -> str:
    pipeline = meta.get("pipeline_parallel_size", 1)
    return (f"{meta.get('world_size')} process(es), tensor_parallel_size={meta.get('tensor_parallel_size')}, "
            f"fsdp_size={meta.get('fsdp_size')}" + (f", pipeline_parallel_size={pipeline}" if pipeline > 1 else ""))


def derived_seed(seed: int, step: int) -> int:
    """The seed every rank takes after a resume on another layout: a function of the recipe's seed and the step
    only, so that two resumes of the same checkpoint on the same layout draw the same dropout masks."""
    return (seed * 1_000_003 + step) % (2**32)


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


__all__ = ["GLOBAL_BATCH_REASON", "LAYOUT_KEYS", "PRETRAIN_REASONS", "SEED_REASON", "checkpoint_metadata",
           "derived_seed", "describe_layout", "find_resume_checkpoint", "model_config_fields", "resume_checkpoint",
           "same_layout"]
