"""megahf's stand-in for transformers' tests/distributed_testing_utils.py, which the sdist does not ship: only
`run_distributed`, the one name tests/test_tensor_parallel_mixin.py imports from it.

`run_distributed(world_size=N)(fn)(*args)` runs `fn(rank, *args)` in N fresh CPU processes joined by a gloo
process group (torchrun's environment variables set), and fails when any rank fails. `fn` is passed by name: the
spawned processes import the restored tests package first (see `_hf_common.distributed_entry`).
"""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(world_size: int = 2):
    def decorator(fn):
        def run(*args):
            from _hf_common import distributed_entry

            mp.spawn(distributed_entry, args=(world_size, _free_port(), fn.__module__, fn.__qualname__, args),
                     nprocs=world_size, join=True)

        return run

    return decorator
