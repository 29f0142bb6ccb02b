"""The launch configs in recipes/accelerate parse as accelerate's config files and say how many processes to start;
the parallel sizes are recipe keys, except that the FSDP2 ones are of accelerate's `distributed_type: FSDP` (what
`accelerate config` writes), read as the recipe's fsdp_size where it is 0 (tests/test_fsdp_launch_config.py). The
CPU ones run real jobs in tests/distributed/test_training_layouts.py (cpu.yaml: the single-process reference;
cpu-multi.yaml: the DDP run; cpu-fsdp2.yaml: the FSDP2 run; the last two extended tier), checked there against each
other; the default tier's real two-process launch is tests/test_plan.py's written MULTI_GPU config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
EXPECTED = {  # file -> (machines, processes, mixed precision)
    "cpu.yaml": (1, 1, "no"),
    "cpu-multi.yaml": (1, 2, "no"),
    "cpu-fsdp2.yaml": (1, 2, "no"),
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
    # FSDP configs are FSDP2 (megahf refuses FSDP1); every other one is a plain launch
    fsdp = name in ("fsdp2.yaml", "cpu-fsdp2.yaml")
    assert config.distributed_type.value == "FSDP" if fsdp else config.distributed_type.value in ("NO", "MULTI_GPU")
    assert config.fsdp_config.get("fsdp_version") == (2 if fsdp else None)
    assert config.use_cpu == (name == "cpu.yaml")
    text = (CONFIGS / name).read_text()
    assert "megahf pretrain" in text  # each says how it is used


def test_slurm_script_is_valid_bash():
    script = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "recipes/accelerate/multi-node.yaml" in script.read_text()
