"""The one launcher of the tests: a command in a session of its own (torchrun on gloo, accelerate launch, or one
process), killed with all its children on timeout; and `megahf pretrain` run as a user would, with what it wrote
read back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "recipes" / "gpt" / "tiny.yaml"
KILLED = Path(__file__).with_name("_pretrain_killed.py")
TIMEOUT_S = 300

sys.path.insert(0, str(REPO_ROOT / "tests"))
from forked_launch import REAL_LAUNCHER, parse_torchrun, run_forked  # noqa: E402
from test_pretrain import write_corpus  # noqa: E402, F401  (one corpus generator for every pretraining test)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(corpus: Path, output_dir: Path, **extra) -> list[str]:
    """A 2-layer, hidden-64 GPT on 32-token blocks: a few seconds per run on one core."""
    values = {
        "corpus": corpus, "output_dir": output_dir, "model_overrides.num_layers": 2,
        "model_overrides.hidden_size": 64, "seq_length": 32, "micro_batch_size": 4, "warmup_steps": 1,
        "learning_rate": 3e-3, "min_learning_rate": 3e-4, "log_interval": 1, "eval_interval": 0,
        "valid_fraction": 0.2, "sample_tokens": 0, **extra,
    }
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def torchrun_command(nproc: int, *entry: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry]


def forked_entry(cmd: list[str]) -> tuple[int | None, tuple[str, str], list[str]] | None:
    """(processes or None for one plain process, master address and port, entry) of a command that
    `forked_launch.run_forked` runs as it would run: torchrun as `torchrun_command` writes it, or `python ENTRY...`
    for a script or `-m megahf`. None for anything else (accelerate launch, `python -c`): that runs as it is."""
    parsed = parse_torchrun(cmd)
    if parsed is not None:
        nproc, address, port, entry = parsed
        return nproc, (address, port), entry
    if cmd[0] == sys.executable and (cmd[1:3] == ["-m", "megahf"] or cmd[1].endswith(".py")):
        return None, ("", ""), cmd[1:]
    return None


def launch(cmd: list[str], what: str, timeout: float = TIMEOUT_S, expect_success: bool = True,
           ) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root, offline, one thread per process, in a session of its own so that a
    timeout ends a launcher and its workers together. Fails the test with the output's tail on a timeout, or on a
    non-zero exit when `expect_success`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    forked = None if REAL_LAUNCHER else forked_entry(cmd)
    if forked is not None:  # torchrun or one python process: ranks forked from a preloaded server (forked_launch.py)
        nproc, master, entry = forked
        status, output = run_forked(entry, env, REPO_ROOT, nproc, master, timeout)
        if status is None:
            pytest.fail(f"{what} timed out after {timeout}s:\n{output[-6000:]}")
        if expect_success and status != 0:
            pytest.fail(f"{what} exited {status}:\n{output[-6000:]}")
        return subprocess.CompletedProcess(cmd, status, output)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout}s:\n{output[-6000:]}")
    if expect_success and proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}:\n{output[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def run_pretrain_cli(nproc: int, args: list[str], kill_at_step: int | None = None, launch_config: str = "",
                     timeout: float = TIMEOUT_S, kill_at_save: int | None = None) -> subprocess.CompletedProcess:
    """`megahf pretrain RECIPE args` on `nproc` processes (torchrun when more than one, or `accelerate launch
    --config_file recipes/accelerate/LAUNCH_CONFIG`); with `kill_at_step` the run SIGKILLs itself after that step and
    must not exit 0 (`kill_at_save`: right after that step's checkpoint was started). Fails the test with the
    output's tail otherwise."""
    entry = ([str(KILLED), "--kill_at_step", str(kill_at_step)] if kill_at_step else
             [str(KILLED), "--kill_at_save", str(kill_at_save)] if kill_at_save else ["-m", "megahf", "pretrain"])
    kill_at_step = kill_at_step or kill_at_save
    if launch_config:
        config = REPO_ROOT / "recipes" / "accelerate" / launch_config
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(free_port()), *entry, str(RECIPE), *args]
    elif nproc == 1:
        cmd = [sys.executable, *entry, str(RECIPE), *args]
    else:
        cmd = torchrun_command(nproc, *entry, str(RECIPE), *args)
    done = launch(cmd, " ".join(cmd), timeout, expect_success=kill_at_step is None)
    if kill_at_step is not None and done.returncode == 0:
        pytest.fail(f"the run was to die at step {kill_at_step} but exited 0:\n{done.stdout[-3000:]}")
    return done


def losses(output_dir: Path) -> dict[int, float]:
    """Training loss of every step, from the trainer state in the newest checkpoint (save_interval must hit the
    last step, which CheckpointCallback always saves)."""
    newest = max((output_dir / "checkpoints").glob("step_*"))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def relative_weight_errors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each weight's max |difference| relative to the model's largest weight, not to that tensor's own: AdamW moves
    every element by about lr whatever its gradient, so the roundoff of a near-zero gradient element becomes a weight
    difference of order lr x roundoff / eps, independent of the tensor's scale."""
    assert got.keys() == expected.keys()
    scale = max(ref.abs().max().item() for ref in expected.values())
    return {n: (got[n] - ref).abs().max().item() / scale for n, ref in expected.items()}

