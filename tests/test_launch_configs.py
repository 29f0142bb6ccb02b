"""The launch configs in recipes/accelerate parse as accelerate's config files and only say how many processes to
start (the parallel sizes are recipe keys). The CPU ones run real jobs in tests/distributed/test_training_layouts.py
(cpu.yaml: the single-process reference; cpu-multi.yaml: the DDP run, extended tier), checked there against each
other; the default tier's real two-process launch is tests/test_plan.py's written MULTI_GPU config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from megahf.parallel.layout import resolve_layout
from megahf.training import RecipeError
from megahf.training.processes import prepare_processes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
EXPECTED = {  # file -> (machines, processes, mixed precision)
    "cpu.yaml": (1, 1, "no"),
    "cpu-multi.yaml": (1, 2, "no"),
    "gpu.yaml": (1, 1, "bf16"),
    "ddp.yaml": (1, 8, "bf16"),
    "fsdp2.yaml": (1, 8, "bf16"),
    "tp.yaml": (1, 8, "bf16"),
    "fsdp2-tp.yaml": (1, 8, "bf16"),
    "multi-node.yaml": (2, 16, "bf16"),
}


def test_every_layout_has_a_launch_config():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_parses(name):
    config = load_config_from_file(str(CONFIGS / name))
    machines, processes, precision = EXPECTED[name]
    assert (config.num_machines, config.num_processes, config.mixed_precision) == (machines, processes, precision)
    # Sharding comes from the recipe, never from accelerate's FSDP plugin (it would shard twice).
    assert config.distributed_type.value in ("NO", "MULTI_GPU")
    assert config.use_cpu == (name == "cpu.yaml")
    text = (CONFIGS / name).read_text()
    assert "megahf pretrain" in text  # each says how it is used


def test_slurm_script_is_valid_bash():
    script = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "recipes/accelerate/multi-node.yaml" in script.read_text()


def test_accelerate_fsdp_plugin_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match=r"FSDP plugin .*shard the model a second time.*fsdp2.yaml"):
        prepare_processes(resolve_layout(world_size=2, fsdp_size=2))
