"""An accelerate launch config of `distributed_type: FSDP` (what `accelerate config` writes for FSDP2) is read as
megahf's FSDP2 layout, for `megahf pretrain` and `megahf finetune` alike: the recipe's fsdp_size 0 takes it, a recipe
size that contradicts it is refused naming both, and every option megahf cannot honour is refused naming the option,
its value and the fix (megahf.parallel.launch_config). The environment each test sets is the one accelerate's own
launcher exports for the config file (`accelerate_env`), not a hand-written imitation of it.

A pre-compute error of such a launch is printed once per launcher, not once per rank (megahf.cli). Real two-process
`accelerate launch` runs with recipes/accelerate/cpu-fsdp2.yaml (extended tier, ~25 s each on two cores): its refusal
at the end of this file, its training run in tests/distributed/test_training_layouts.py (layout fsdp2-accelerate,
equal to one process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

from megahf.cli import main
from megahf.recipe import FinetuneRecipe, parse_recipe
from megahf.training import RecipeError
from megahf.training.finetune import run_finetune
from megahf.training.processes import prepare_processes
from megahf.training.setup import build_layout, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
GPT = ROOT / "recipes" / "gpt" / "gpt-1.2b.yaml"  # fsdp_size: 0, tensor_parallel_size: 1
SST2 = ROOT / "recipes" / "glue" / "sst2.yaml"


def accelerate_env(tmp_path: Path, base: str = "fsdp2.yaml", fsdp: dict | None = None, **top) -> dict[str, str]:
    """The FSDP and parallelism variables `accelerate launch --config_file` exports to its processes for the shipped
    config `base` with `fsdp` merged into its fsdp_config and `top` into its top level (accelerate's own parser and
    `prepare_multi_gpu_env`, as `accelerate launch` calls them)."""
    config = yaml.safe_load((CONFIGS / base).read_text())
    config["fsdp_config"] = {**config.get("fsdp_config", {}), **(fsdp or {})}
    config.update(top)
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(config))
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "PARALLELISM_CONFIG_", "ACCELERATE_USE_"))}


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Set what accelerate exports for a config (and the launcher's world) in this process's environment, in place of
    what an earlier call set."""

    def launch(world: int, local_world: int | None = None, **config) -> None:
        for key in list(os.environ):
            if key.startswith(("FSDP_", "PARALLELISM_CONFIG_", "ACCELERATE_USE_")):
                monkeypatch.delenv(key)
        for key, value in accelerate_env(tmp_path, **config).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world or world))

    return launch


def gpt_layout(*overrides: str):
    return build_layout(load_recipe(GPT, list(overrides)))


def test_the_shipped_fsdp2_config_is_the_recipes_fsdp_layout(launched):
    launched(8)  # recipes/accelerate/fsdp2.yaml as shipped: FULL_SHARD over the node's 8 GPUs
    layout = gpt_layout()
    assert (layout.fsdp_size, layout.replicas, layout.tensor_parallel_size) == (8, 1, 1)
    assert gpt_layout("--fsdp_size", "8").fsdp_size == 8  # a recipe that says the same is welcome
    launched(16, local_world=8)  # two nodes: FULL_SHARD shards over all 16
    assert gpt_layout().fsdp_size == 16


def test_hybrid_and_no_shard_and_the_parallelism_config_are_mapped(launched):
    launched(16, local_world=8, fsdp={"fsdp_sharding_strategy": "HYBRID_SHARD"})
    layout = gpt_layout()  # shard inside each node, replicate across the two
    assert (layout.fsdp_size, layout.replicas) == (8, 2)
    launched(8, fsdp={"fsdp_sharding_strategy": "NO_SHARD"})
    assert (gpt_layout().fsdp_size, gpt_layout().replicas) == (1, 8)  # DDP
    sizes = {"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 2,
             "parallelism_config_dp_replicate_size": 2}
    launched(8, parallelism_config=sizes)
    layout = gpt_layout("--tensor_parallel_size", "2")
    assert (layout.tensor_parallel_size, layout.fsdp_size, layout.replicas) == (2, 2, 2)
    launched(8)  # pipeline stages are outside the data-parallel ranks: FULL_SHARD shards over 8 / 2
    layout = gpt_layout("--pipeline_parallel_size", "2")
    assert (layout.pipeline_parallel_size, layout.fsdp_size, layout.replicas) == (2, 4, 1)


@pytest.mark.parametrize("world, config, overrides, message", [
    (8, {}, ["--fsdp_size", "4"], r"recipe key fsdp_size=4 contradicts the launch config \(distributed_type: FSDP, "
     r"FULL_SHARD: all 8 data-parallel ranks, i.e. fsdp_size=8\); set fsdp_size: 8 or 0"),
    (8, {}, ["--fsdp_size", "1"], r"fsdp_size=1 contradicts .*or launch with a MULTI_GPU config"),
    (8, {"parallelism_config": {"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 4}}, [],
     r"recipe key tensor_parallel_size=1 contradicts the launch config's parallelism_config_tp_size: 2; set "
     r"tensor_parallel_size: 2"),
    (8, {"parallelism_config": {"parallelism_config_dp_shard_size": 2}}, [],
     r"parallelism_config_dp_replicate_size: 1 x dp_shard_size: 2 x tp_size: 1 = 2 processes, but 8 were launched"),
    (8, {"parallelism_config": {"parallelism_config_dp_shard_size": 4, "parallelism_config_cp_size": 2}}, [],
     r"parallelism_config_cp_size: 2 .*no context parallelism; set parallelism_config_cp_size: 1"),
    (8, {"fsdp": {"fsdp_version": 1}}, [], r"fsdp_version: 1 \(FSDP_VERSION\): megahf trains with FSDP2 only .*set "
     r"fsdp_version: 2"),
    (8, {"fsdp": {"fsdp_offload_params": True}}, [], r"fsdp_offload_params: true \(FSDP_OFFLOAD_PARAMS\): .*set "
     r"fsdp_offload_params: false"),
    (8, {"fsdp": {"fsdp_reshard_after_forward": False}}, [], r"fsdp_reshard_after_forward: false .*set "
     r"fsdp_reshard_after_forward: true"),
    (8, {"fsdp": {"fsdp_sharding_strategy": "SHARD_GRAD_OP"}}, [], r"fsdp_sharding_strategy: SHARD_GRAD_OP .*use "
     r"FULL_SHARD, HYBRID_SHARD"),
    (8, {"fsdp": {"fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}}, [], r"fsdp_auto_wrap_policy: SIZE_BASED_WRAP .*one "
     r"unit per transformer layer .*set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"),
    (8, {"fsdp": {"fsdp_transformer_layer_cls_to_wrap": "GPT2Block"}}, [], r"fsdp_transformer_layer_cls_to_wrap: "
     r"GPT2Block .*wraps its own layer classes \(MegatronGPTLayer, MegatronBertLayer\)"),
    (8, {"fsdp": {"fsdp_state_dict_type": "FULL_STATE_DICT"}}, [], r"fsdp_state_dict_type: FULL_STATE_DICT .*set "
     r"fsdp_state_dict_type: SHARDED_STATE_DICT"),
    (8, {"fsdp": {"fsdp_activation_checkpointing": True}}, ["--recompute", "none"], r"fsdp_activation_checkpointing: "
     r"true .*contradicts "
     r"recipe key recompute='none'; set recompute: full"),
    (12, {"fsdp": {"fsdp_sharding_strategy": "HYBRID_SHARD"}}, ["--global_batch_size", "0"],  # 12 on nodes of 8
     r"HYBRID_SHARD shards over the processes of one node \(8\)"),
])
def test_what_megahf_cannot_honour_is_refused_naming_option_value_and_fix(launched, world, config, overrides,
                                                                          message):
    launched(world, local_world=8, **config)
    with pytest.raises(RecipeError, match=message):
        gpt_layout(*overrides)


def test_activation_checkpointing_is_the_recipes_recompute(launched):
    launched(8, fsdp={"fsdp_activation_checkpointing": True})
    assert gpt_layout("--recompute", "full").fsdp_size == 8


def test_without_an_fsdp_config_fsdp_size_0_is_no_sharding(launched):
    launched(8, base="ddp.yaml")
    layout = gpt_layout()
    assert (layout.fsdp_size, layout.replicas) == (1, 8)


def test_accelerates_own_fsdp_plugin_is_turned_off_once_the_layout_is_read(launched):
    launched(2, base="cpu-fsdp2.yaml")
    layout = gpt_layout("--global_batch_size", "0")
    prepare_processes(layout)
    assert layout.fsdp_size == 2
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # what accelerate.state reads to start its FSDP plugin


def test_finetune_reads_the_same_launch_config(launched):
    launched(8)
    recipe = parse_recipe(FinetuneRecipe, SST2, ["--model", "bert-tiny"])
    assert build_layout(recipe).fsdp_size == 8
    for overrides, message in [
        (["--fsdp_size", "2"], r"recipe key fsdp_size=2 contradicts the launch config"),
        (["--optim", "adamw_bnb_8bit"], r"optim='adamw_bnb_8bit' under the launch config's distributed_type: FSDP "
                                        r"\(fsdp_size=8\).*use optim: adamw"),
    ]:
        with pytest.raises(RecipeError, match=message):  # refused by run_finetune before anything is computed
            run_finetune(parse_recipe(FinetuneRecipe, SST2, ["--model", "bert-tiny", *overrides]))
    launched(8, fsdp={"fsdp_activation_checkpointing": True})
    with pytest.raises(RecipeError, match=r"megahf finetune does not recompute activations; set "
                                          r"fsdp_activation_checkpointing: false"):
        run_finetune(recipe)


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_a_pre_compute_error_is_printed_by_the_first_process_only(launched, monkeypatch, capsys, local_rank,
                                                                  printed):
    launched(8)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["pretrain", str(GPT), "--fsdp_size", "4"]) == 2  # every process exits 2
    err = capsys.readouterr().err
    assert err.count("error: recipe layout: recipe key fsdp_size=4 contradicts") == int(printed), err
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["pretrain", str(GPT), "--fsdp_sise", "4"]) == 2  # a bad key: also read alike by every process
    assert ("did you mean '--fsdp_size'" in capsys.readouterr().err) == printed


def test_an_error_met_later_is_printed_by_every_process(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "1")  # not marked alike on every rank: each process's own error prints
    assert main(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", "gpt2",
                 "--output-prefix", str(tmp_path / "out")]) == 2
    assert "megahf preprocess: error:" in capsys.readouterr().err


@pytest.mark.extended  # ~25 s on two cores: two processes import torch and transformers side by side
def test_a_real_two_process_accelerate_launch_prints_its_layout_error_once(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/cpu-fsdp2.yaml` starts 2 processes; both refuse a recipe
    that contradicts the launch config, and the error is printed once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu-fsdp2.yaml"),
           "--main_process_port", "0", "-m", "megahf", "pretrain", str(ROOT / "recipes" / "gpt" / "tiny.yaml"),
           "--fsdp_size", "1", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("megahf pretrain: error:")]
    assert errors == ["megahf pretrain: error: recipe layout: recipe key fsdp_size=1 contradicts the launch config "
                      "(distributed_type: FSDP, FULL_SHARD: all 2 data-parallel ranks, i.e. fsdp_size=2); set "
                      "fsdp_size: 2 or 0 (take the launch config's), or launch with a MULTI_GPU config "
                      "(recipes/accelerate/cpu-multi.yaml, ddp.yaml) to keep fsdp_size=1"], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
