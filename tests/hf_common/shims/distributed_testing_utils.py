"""megahf's stand-in for transformers' tests/distributed_testing_utils.py, which the sdist does not ship: only
`run_distributed`, the one name tests/test_tensor_parallel_mixin.py imports from it.

`run_distributed(world_size=N)(fn)(*args)` runs `fn(rank, *args)` in N fresh CPU processes joined by a gloo
process group (torchrun's environment variables set), and fails when any rank fails.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(world_size: int = 2):
    def decorator(fn):
        def run(*args):
            mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)

        return run

    return decorator
