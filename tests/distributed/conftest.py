"""Launch `tests/distributed/_worker.py` under torchrun (gloo, CPU) and read back the JSON it writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(nproc: int, args: list[str], out: Path, timeout: float = TIMEOUT_S) -> dict:
    """Run the worker on `nproc` processes; fail the test with the output's tail unless it exits 0 and writes `out`."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKER), *args, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A session of its own, so that a timeout ends torchrun and its workers together.
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun ({nproc} procs, {' '.join(args)}) timed out after {timeout}s:\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun ({nproc} procs, {' '.join(args)}) exited {proc.returncode}:\n{output[-6000:]}")
    if not out.exists():
        pytest.fail(f"the worker exited 0 but wrote no result to {out}:\n{output[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun
