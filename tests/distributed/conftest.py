"""Launch `tests/distributed/_worker.py` under torchrun (gloo, CPU) and read back the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _launch import TIMEOUT_S, launch, torchrun_command

WORKER = Path(__file__).with_name("_worker.py")


def run_torchrun(nproc: int, args: list[str], out: Path, timeout: float = TIMEOUT_S, worker: Path = WORKER) -> dict:
    """Run `worker` (the parity worker by default) on `nproc` processes; fail the test with the output's tail unless
    it exits 0 and writes `out`."""
    done = launch(torchrun_command(nproc, str(worker), *args, "--out", str(out)),
                  f"torchrun ({nproc} procs, {' '.join(args)})", timeout)
    if not out.exists():
        pytest.fail(f"the worker exited 0 but wrote no result to {out}:\n{done.stdout[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun
