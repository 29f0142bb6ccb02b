"""Run by `torchrun` (gloo, CPU): `megahf evaluate` as a user runs it, at several tensor-parallel sizes in one launch
(starting processes costs more than these evaluations). Each `--evaluation NAME:ARGS` is run once per
`--tensor-parallel-sizes` entry with `--output-json OUT/NAME-tpN.json`; a failing evaluation exits non-zero."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch
import torch.distributed as dist

from megahf.cli import main as megahf_main


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-parallel-sizes", required=True, help="comma-separated, e.g. 1,2")
    parser.add_argument("--evaluation", action="append", required=True, help="NAME:megahf evaluate arguments")
    parser.add_argument("--out", required=True, help="folder of the JSON results")
    args = parser.parse_args()

    # The group exists before megahf's evaluation runs, which then joins it and leaves it alone (several runs).
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for tp in args.tensor_parallel_sizes.split(","):
        for evaluation in args.evaluation:
            name, _, rest = evaluation.partition(":")
            output = Path(args.out) / f"{name}-tp{tp}.json"
            status = megahf_main(["evaluate", *shlex.split(rest), "--tensor-parallel-size", tp,
                                  "--output-json", str(output), "--no-progress"])
            if status != 0:
                raise SystemExit(f"megahf evaluate {rest} at tensor_parallel_size={tp} exited {status}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run()
