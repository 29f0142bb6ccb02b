"""An accelerate launch config of `distributed_type: FSDP` (what `accelerate config` writes for FSDP), read as megahf's
FSDP2 layout.

`accelerate launch --config_file X` hands its config to every process as environment variables (accelerate 1.15,
`accelerate/utils/launch.py`): ACCELERATE_USE_FSDP=true and FSDP_<OPTION> for each `fsdp_<option>` of `fsdp_config`,
and PARALLELISM_CONFIG_<SIZE> for its `parallelism_config`. megahf shards the model itself (transformers'
`DistributedConfig`, from the layout), so it reads that request here, refuses what it cannot honour (one line naming
the option, its value and the fix), and `hand_over_sharding` then turns accelerate's own FSDP plugin off for the run:
left on, it would shard the model a second time.

    launch = read_fsdp_launch(os.environ, layer_classes=("MegatronGPTLayer",))  # None without an FSDP config
    fsdp_size = launch_fsdp_size(launch, recipe_fsdp_size=0, world_size=8, tensor_parallel_size=1,
                                 local_world_size=8)  # -> 8: FULL_SHARD shards over every data-parallel rank

This module imports nothing but the standard library (the recipe checks run without torch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .layout import LayoutError

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # accelerate's
TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class FsdpLaunch:
    """What the launch config asks for, in megahf's terms (None: the launch config does not say)."""

    strategy: str  # FULL_SHARD, HYBRID_SHARD or NO_SHARD
    tensor_parallel_size: int | None = None  # parallelism_config_tp_size
    fsdp_size: int | None = None  # parallelism_config_dp_shard_size
    replicas: int | None = None  # parallelism_config_dp_replicate_size
    activation_checkpointing: bool = False

    def describe(self) -> str:
        if self.fsdp_size is not None:
            return (f"distributed_type: FSDP with parallelism_config_dp_shard_size: {self.fsdp_size}, "
                    f"parallelism_config_dp_replicate_size: {self.replicas}")
        return f"distributed_type: FSDP, sharding strategy {self.strategy}"


def _refuse(option: str, value: str, why_and_fix: str, key: str = "") -> LayoutError:
    """The error for environment variable `option` (the launch config's key `key`, by default its lower case)."""
    return LayoutError(f"the launch config's {key or option.lower()}: {value} ({option}): {why_and_fix}")


def _flag(environ: Mapping[str, str], option: str) -> bool:
    return environ.get(option, "false").strip().lower() in TRUE


def read_fsdp_launch(environ: Mapping[str, str] = os.environ,
                     layer_classes: tuple[str, ...] = ()) -> FsdpLaunch | None:
    """The FSDP request of the launch config that started this process, or None when it is not `distributed_type:
    FSDP`; `LayoutError` for an option megahf cannot honour. `layer_classes`: the transformer layer classes megahf's
    FSDP plan wraps (what TRANSFORMER_BASED_WRAP may name)."""
    if not _flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise _refuse("FSDP_VERSION", version, "megahf trains with FSDP2 only (accelerate starts FSDP1 when "
                      "fsdp_config names no fsdp_version); set fsdp_version: 2 in the launch config's fsdp_config, "
                      "as recipes/accelerate/fsdp2.yaml does")
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        raise _refuse("FSDP_OFFLOAD_PARAMS", "true", "megahf keeps parameters, gradients and optimizer state on the "
                      "device; set fsdp_offload_params: false (to fit a larger model, raise fsdp_size or "
                      "tensor_parallel_size: `megahf plan` shows what fits)")
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in TRUE:
        raise _refuse("FSDP_RESHARD_AFTER_FORWARD", reshard, "megahf shards by the model's own FSDP plan, where "
                      "every transformer layer frees its gathered weights after the forward pass; set "
                      "fsdp_reshard_after_forward: true")
    strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy.isdigit() and 1 <= int(strategy) <= len(SHARDING_STRATEGIES):  # accelerate also takes 1..5
        strategy = SHARDING_STRATEGIES[int(strategy) - 1]
    if strategy not in ("FULL_SHARD", "HYBRID_SHARD", "NO_SHARD"):
        raise _refuse("FSDP_SHARDING_STRATEGY", strategy, "megahf's FSDP2 frees the gathered weights of each layer "
                      "after its forward pass (what SHARD_GRAD_OP and HYBRID_SHARD_ZERO2 keep); use FULL_SHARD, "
                      "HYBRID_SHARD (shard inside a node, replicate across nodes) or NO_SHARD (DDP)"
                      if strategy in SHARDING_STRATEGIES else f"use one of {', '.join(SHARDING_STRATEGIES[:4])}")
    wrap = environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if wrap != "TRANSFORMER_BASED_WRAP":
        raise _refuse("FSDP_AUTO_WRAP_POLICY", wrap, "megahf shards by the model's own FSDP plan, one unit per "
                      "transformer layer (what TRANSFORMER_BASED_WRAP does); set fsdp_auto_wrap_policy: "
                      "TRANSFORMER_BASED_WRAP or leave it out")
    named = [name.strip() for name in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    unknown = [name for name in named if layer_classes and name not in layer_classes]
    if unknown:
        raise _refuse("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(named), f"megahf's FSDP plan wraps its own layer "
                      f"classes ({', '.join(layer_classes)}), not {', '.join(unknown)}; leave "
                      "fsdp_transformer_layer_cls_to_wrap out (or name those)", "fsdp_transformer_layer_cls_to_wrap")
    state_dict = environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").strip().upper()
    if state_dict != "SHARDED_STATE_DICT":
        raise _refuse("FSDP_STATE_DICT_TYPE", state_dict, "megahf's checkpoints are sharded (PyTorch distributed "
                      "checkpoints) and final/ is always one whole model folder; set fsdp_state_dict_type: "
                      "SHARDED_STATE_DICT")
    if _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"):
        raise _refuse("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "true", "megahf keeps recomputed layers' inputs on "
                      "the device; set fsdp_activation_checkpointing_offload: false")
    if environ.get("FSDP_IGNORED_MODULES"):
        raise _refuse("FSDP_IGNORED_MODULES", environ["FSDP_IGNORED_MODULES"], "megahf shards every module by the "
                      "model's own FSDP plan; leave fsdp_ignored_modules out")
    launch = FsdpLaunch(strategy=strategy, activation_checkpointing=_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"))
    if not _flag(environ, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        return launch
    sizes = {key: environ.get(f"PARALLELISM_CONFIG_{key}", "1") for key in
             ("TP_SIZE", "DP_SHARD_SIZE", "DP_REPLICATE_SIZE", "CP_SIZE", "SP_SIZE")}
    for key, value in sizes.items():
        if not value.isdigit() or int(value) < 1:
            raise _refuse(f"PARALLELISM_CONFIG_{key}", value, "use a whole number of at least 1")
    if sizes["CP_SIZE"] != "1":
        raise _refuse("PARALLELISM_CONFIG_CP_SIZE", sizes["CP_SIZE"], "megahf has no context parallelism; set "
                      "parallelism_config_cp_size: 1 (for long sequences: recipe keys sequence_parallel and recompute)")
    if sizes["SP_SIZE"] != "1":
        raise _refuse("PARALLELISM_CONFIG_SP_SIZE", sizes["SP_SIZE"], "that is DeepSpeed-Ulysses sequence "
                      "parallelism; megahf's is Megatron's (recipe key sequence_parallel, over the tensor-parallel "
                      "ranks); set parallelism_config_sp_size: 1")
    return FsdpLaunch(strategy=strategy, tensor_parallel_size=int(sizes["TP_SIZE"]),
                      fsdp_size=int(sizes["DP_SHARD_SIZE"]), replicas=int(sizes["DP_REPLICATE_SIZE"]),
                      activation_checkpointing=launch.activation_checkpointing)


def launch_fsdp_size(launch: FsdpLaunch | None, recipe_fsdp_size: int, world_size: int, tensor_parallel_size: int,
                     local_world_size: int, pipeline_parallel_size: int = 1) -> int:
    """The layout's FSDP size: the recipe's `fsdp_size` when it states one (0: not stated), which the launch config
    must not contradict; otherwise the launch config's (FULL_SHARD: every data-parallel rank; HYBRID_SHARD: the
    data-parallel ranks of one node, replicated across nodes; NO_SHARD: 1, i.e. DDP), or 1 without an FSDP config.
    `LayoutError` names both sides of a contradiction."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if launch is None:
        return recipe_fsdp_size or 1
    if launch.tensor_parallel_size is not None and launch.tensor_parallel_size != tp:
        raise LayoutError(
            f"recipe key tensor_parallel_size={tp} contradicts the launch config's parallelism_config_tp_size: "
            f"{launch.tensor_parallel_size}; set tensor_parallel_size: {launch.tensor_parallel_size} in the recipe "
            f"(where the model's divisibility is checked), or parallelism_config_tp_size: {tp} in the launch config"
        )
    dp = world_size // (tp * pp) if world_size % (tp * pp) == 0 else 0  # 0: resolve_layout refuses the world size
    if launch.fsdp_size is not None:
        product = launch.replicas * launch.fsdp_size * tp * pp
        if product != world_size:
            stages = f" x pipeline_parallel_size={pp}" if pp > 1 else ""
            raise LayoutError(
                f"the launch config's parallelism_config_dp_replicate_size: {launch.replicas} x dp_shard_size: "
                f"{launch.fsdp_size} x tp_size: {tp}{stages} = {product} processes, but {world_size} were launched; "
                f"make their product the launch config's num_processes ({world_size})"
            )
        wanted, why = launch.fsdp_size, f"parallelism_config_dp_shard_size: {launch.fsdp_size}"
    elif launch.strategy == "NO_SHARD":
        wanted, why = 1, "NO_SHARD: data parallel without sharding"
    elif launch.strategy == "HYBRID_SHARD" and pp > 1:
        raise LayoutError(
            f"the launch config's fsdp_sharding_strategy: HYBRID_SHARD with recipe key pipeline_parallel_size={pp}: "
            "megahf does not place one node's ranks in one pipeline stage for it; use FULL_SHARD, or state fsdp_size "
            "in the recipe with a MULTI_GPU launch config"
        )
    elif launch.strategy == "HYBRID_SHARD":
        local = local_world_size // tp if local_world_size % tp == 0 else 0
        if not local or (dp and dp % local):
            raise LayoutError(
                f"the launch config's fsdp_sharding_strategy: HYBRID_SHARD shards over the processes of one node "
                f"({local_world_size}) / tensor_parallel_size={tp}, which does not divide {world_size} processes "
                f"into whole nodes; use FULL_SHARD, or a tensor_parallel_size that divides {local_world_size}"
            )
        wanted, why = local, f"HYBRID_SHARD: the {local} data-parallel ranks of one node"
    else:
        wanted, why = dp, f"FULL_SHARD: all {dp} data-parallel ranks"
    if recipe_fsdp_size and recipe_fsdp_size != wanted:
        raise LayoutError(
            f"recipe key fsdp_size={recipe_fsdp_size} contradicts the launch config (distributed_type: FSDP, {why}, "
            f"i.e. fsdp_size={wanted}); set fsdp_size: {wanted} or 0 (take the launch config's), or launch with a "
            f"MULTI_GPU config (recipes/accelerate/cpu-multi.yaml, ddp.yaml) to keep fsdp_size={recipe_fsdp_size}"
        )
    return wanted


def hand_over_sharding() -> None:
    """megahf shards the model (transformers' `DistributedConfig`): turn off what would make accelerate shard it
    again in this process (its FSDP plugin) or build a `ParallelismConfig` of its own from the launch config."""
    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_PARALLELISM_CONFIG"):
        if flag in os.environ:
            os.environ[flag] = "false"


__all__ = ["FsdpLaunch", "hand_over_sharding", "launch_fsdp_size", "read_fsdp_launch"]
