"""megahf's stand-in for transformers' tests/distributed_testing_utils.py, which the sdist does not ship: only
`run_distributed`, the one name tests/test_tensor_parallel_mixin.py imports from it.

`run_distributed(world_size=N)(fn)(*args)` runs `fn(rank, *args)` in N CPU processes joined by a gloo process group
(torchrun's environment variables set), and fails when any rank fails. The processes are forked from a server that
has imported torch and transformers once (tests/forked_launch.py says why), not spawned as fresh interpreters that
each import them again. `fn` is passed by name: the processes import the restored tests package first (see
`_hf_common.distributed_entry`).
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
            from forked_launch import forkserver_context

            forkserver_context()  # the server's preloaded modules
            mp.start_processes(distributed_entry, args=(world_size, _free_port(), fn.__module__, fn.__qualname__, args),
                               nprocs=world_size, join=True, start_method="forkserver")

        return run

    return decorator
