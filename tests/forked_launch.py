"""Processes for the tests' distributed runs, forked from a server that has imported torch, transformers and megahf
once, instead of fresh interpreters that each import them again.

Why: on a 2-core machine one fresh interpreter spends about 10 CPU-seconds importing torch, transformers (which
imports torch._dynamo and torch._inductor at import) and megahf's Trainer before it runs a single step, and the
suite starts well over a hundred of them; that, not the tiny models, was most of the default tier's time.

How: Python's `forkserver` start method, with the heavy modules preloaded (`forkserver_context`). The server is a
fresh, single-threaded interpreter that only imports, so forking it is safe (no thread, no OpenMP pool, no process
group to inherit). `run_like_torchrun` gives each rank torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, ..., OMP_NUM_THREADS applied as torch applies it at import), the command's arguments, its standard
output and error in one stream, and torchrun's failure rule: when a rank fails, the others are stopped and the launch
exits 1. What runs inside a rank is the same code a user's `torchrun` runs (`megahf pretrain`, a worker script).

The launchers themselves stay tested: `accelerate launch` with the shipped configs (one process and two, the latter
through torch's elastic launcher) runs for real in tests/distributed/test_training_layouts.py, and
MEGAHF_TEST_LAUNCHER=torchrun sends every launch through real torchrun.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path

REAL_LAUNCHER = os.environ.get("MEGAHF_TEST_LAUNCHER") == "torchrun"

PRELOAD = ["forked_launch", "torch", "torch.distributed.tensor", "transformers", "transformers.modeling_utils",
           "transformers.trainer", "megahf", "megahf.cli", "megahf.training.pretrain", "megahf.training.finetune"]

_context = None


def forkserver_context():
    """The one forkserver context of this process, its server preloaded with `PRELOAD` (also used by
    tests/hf_common's `run_distributed`)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def parse_torchrun(cmd: list[str]) -> tuple[int, str, str, list[str]] | None:
    """(processes, master address, master port, entry) of `python -m torch.distributed.run --nnodes 1
    --nproc_per_node N --master_addr A --master_port P ENTRY...`, as tests/distributed/_launch.py writes it; None
    for any other command."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node"]
    if cmd[:len(head)] != head or cmd[len(head) + 1:len(head) + 5:2] != ["--master_addr", "--master_port"]:
        return None
    return int(cmd[len(head)]), cmd[len(head) + 2], cmd[len(head) + 4], cmd[len(head) + 5:]


def _rank_main(entry: list[str], env: dict[str, str], cwd: str, output: str) -> None:
    """One rank, in a process forked from the server: torchrun's environment, output into `output`, then `entry` run
    as `python ENTRY...` would run it."""
    fd = os.open(output, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered, as `python -u` would
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1)))  # what torch reads at its import
    try:
        if entry[0] == "-m":
            sys.argv = [entry[1], *entry[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(entry)
            sys.path.insert(0, str(Path(entry[0]).resolve().parent))
            runpy.run_path(entry[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # a multiprocessing child ends with os._exit; an interpreter would run these


def run_forked(entry: list[str], env: dict[str, str], cwd: Path, nproc: int | None = None,
               master: tuple[str, str] = ("127.0.0.1", "0"), timeout: float = 300.0) -> tuple[int | None, str]:
    """Run `python ENTRY...` once (`nproc` None), or as `torchrun --nproc_per_node NPROC ENTRY...` would. Returns
    (exit status, the ranks' output): a single process's own status (negative: killed by that signal), torchrun's
    1 when any rank failed, or None on a timeout (everything is killed then)."""
    context = forkserver_context()
    ranks = 1 if nproc is None else nproc
    with tempfile.NamedTemporaryFile("w+", prefix="megahf-launch-", suffix=".txt") as out:
        processes = []
        for rank in range(ranks):
            rank_env = dict(env)
            if nproc is not None:
                rank_env.update(
                    MASTER_ADDR=master[0], MASTER_PORT=master[1], RANK=str(rank), LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                    ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc), ROLE_NAME="default", TORCHELASTIC_RUN_ID="none",
                    TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                    TORCHELASTIC_USE_AGENT_STORE="False", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
            process = context.Process(target=_rank_main, args=(entry, rank_env, str(cwd), out.name), daemon=False)
            process.start()
            processes.append(process)
        status = _wait(processes, timeout)
        out.seek(0)
        output = out.read()
    if status is not None and nproc is not None:
        status = 0 if status == 0 else 1
    return status, output


def _wait(processes: list, timeout: float) -> int | None:
    """Wait for every rank; as torchrun does, stop the rest when one fails. The first failure's status (or 0), None
    on a timeout."""
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.exitcode is None for p in processes):
        if time.monotonic() > deadline:
            _stop(processes, signal.SIGKILL)
            return None
        failure = next((p.exitcode for p in processes if p.exitcode not in (None, 0)), None)
        if failure is not None and failed is None:
            failed = failure
            _stop(processes, signal.SIGTERM)
            grace = time.monotonic() + 10
            while any(p.exitcode is None for p in processes) and time.monotonic() < grace:
                time.sleep(0.05)
            _stop(processes, signal.SIGKILL)
        time.sleep(0.05)
    for p in processes:
        p.join()
    return failed if failed is not None else next((p.exitcode for p in processes if p.exitcode != 0), 0)


def _stop(processes: list, sig: int) -> None:
    for p in processes:
        if p.exitcode is None and p.pid is not None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
