"""The CPU peak that MFU divides by, measured by a launch of one process and by a launch of two (issue #14).

    python scripts/bench/launch_peak.py [--rounds 3] [--output scripts/bench/results/launch_peak_cpu.txt]

`megahf.training.flops.launch_peak_tflops` measures a CPU machine's fp32 matmul rate with every process of the launch
at once, each with the threads it trains with, and sums them. One process of N threads and N processes of one thread
should then see about the same machine: large matmuls scale almost linearly over cores. The old measurement (rank 0
alone, the other ranks waiting in a barrier) read 0.42x, and a two-process run logged an MFU twice a one-process run's.

This is timing, so it is a benchmark and not a test: it says something only on an otherwise idle machine (the load
average is printed with each round). Rounds alternate one and two processes so that a drift of the load hits both; the
ratio printed is the median of the rounds'. The exact part, how the ranks' rates combine, is tested with faked rates in
tests/distributed/test_launch_peak.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure_in_this_launch() -> None:
    """Run under torchrun: every rank measures, rank 0 prints the launch's peak as one JSON line."""
    import torch.distributed as dist

    from megahf.parallel.ranks import is_rank_zero
    from megahf.training.flops import launch_peak_tflops

    dist.init_process_group("gloo")
    tflops, source, devices = launch_peak_tflops()
    if is_rank_zero():
        print("PEAK " + json.dumps({"tflops": tflops * devices, "source": source}), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300)
    line = next(line for line in done.stdout.splitlines() if line.startswith("PEAK "))
    return json.loads(line.removeprefix("PEAK "))


def load_average() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().split()[0] if path.exists() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "scripts/bench/results/launch_peak_cpu.txt")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return measure_in_this_launch()

    cores = os.cpu_count() or 1
    lines = [f"launch peak on {cores} cores: one process of {cores} threads vs {cores} processes of one thread"]
    ratios = []
    for round_ in range(args.rounds):
        one, many = launch(1, cores), launch(cores, 1)
        ratios.append(many["tflops"] / one["tflops"])
        lines.append(f"round {round_}: load {load_average()}  one process {one['tflops']:.4f} TFLOP/s  "
                     f"{cores} processes {many['tflops']:.4f} TFLOP/s ({many['source']})  ratio {ratios[-1]:.3f}")
    lines.append(f"median ratio {statistics.median(ratios):.3f} (1.0: both launches see the same machine; "
                 "the old rank-0-only measurement read 0.42)")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
