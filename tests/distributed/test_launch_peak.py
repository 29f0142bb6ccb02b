"""The peak that MFU divides by is the machine's, whatever the number of processes sharing it (issue #14).

With two processes on one machine, rank 0 used to measure the whole machine's matmul rate while rank 1 waited for it
in a barrier, and a multi-process run logged an MFU more than twice a one-process run's on the same cores (88.7%
against 38%). Now every process measures at once, with the threads it trains with, in lock step (a barrier before
each timed matmul), and the machine's peak is their sum.

Timing is not judged here: scripts/bench/launch_peak.py measures one process against two on a real machine
(scripts/bench/results/launch_peak_cpu.txt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from _launch import launch, torchrun_command

WORKER = str(Path(__file__).with_name("_peak_worker.py"))


def measured_peak(nproc: int, *flags: str) -> dict:
    done = launch(torchrun_command(nproc, WORKER, *flags), f"peak on {nproc} process(es)")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PEAK "))
    return json.loads(line.removeprefix("PEAK "))


def test_every_process_measures_in_lock_step_and_the_machine_peak_is_their_sum():
    """Exact, apart from timing: rank r's rate is faked as r + 1 TFLOP/s."""
    two = measured_peak(2, "--fake")
    assert two["tflops"] == 1.0 + 2.0 and two["devices"] == 1, two  # one machine, its two processes summed
    assert two["syncs"] == 3 and two["threads"] == [1], two  # synced each time; the launcher's 1 thread per process


def test_one_process_measures_with_every_core(monkeypatch):
    from megahf.training import flops

    calls = []
    monkeypatch.setattr(flops, "measure_cpu_matmul_tflops", lambda threads=None, sync=None: calls.append(threads) or 1.5)
    assert flops.launch_peak_tflops() == (1.5, f"fp32 matmul measured on {os.cpu_count()} cores", 1)
    assert calls == [os.cpu_count()]  # not the one thread a launcher gives each process
