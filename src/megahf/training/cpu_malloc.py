"""Keep freed memory in the process for reuse, as PyTorch's caching allocator does on a GPU.

PyTorch has no caching allocator on CPU: every tensor comes from the C library's malloc. glibc serves a large
block (above a threshold that grows to at most 32 MiB) with a fresh `mmap` and hands it back to the kernel when it
is freed, so each training step faults in its largest tensors page by page again: the chunked loss's logits buffer
(`loss_chunk_size` x vocabulary), the output layer's weight gradient, the embedding gradient. On two cores at GPT-2's
vocabulary that is about a sixth of a small model's step (`scripts/bench/pretrain.py` measures it).

Raising glibc's mmap threshold and trim threshold (`mallopt`) serves such blocks from the heap and keeps what is
freed there, so the next step reuses pages that are already mapped. The memory a run holds stays near its peak
instead of dropping between steps; the peak itself does not change. The same trade as the jemalloc/tcmalloc that
`python -m torch.backends.xeon.run_cpu` preloads, without preloading anything.

Only for glibc (Linux), only when training on CPU, and only where `MEGAHF_CPU_MALLOC` is not `system`.
"""

from __future__ import annotations

import ctypes
import os
import platform

from ..errors import MegahfError

ENV_VAR = "MEGAHF_CPU_MALLOC"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap; up to 2 GiB of free memory at the heap's top stays mapped.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1


class MallocSettingError(MegahfError, ValueError):
    """`MEGAHF_CPU_MALLOC` holds a value other than `keep` or `system`."""


def keep_freed_memory() -> str | None:
    """Tune glibc's malloc for a training process (see the module docstring). Returns a line for the log saying
    what was done, or None where nothing was (not glibc, or `MEGAHF_CPU_MALLOC=system`)."""
    choice = os.environ.get(ENV_VAR, "keep").strip().lower()
    if choice not in ("keep", "system"):
        raise MallocSettingError(f"{ENV_VAR}={choice!r}: use 'keep' (freed memory is kept for reuse; the default "
                                 "on CPU) or 'system' (glibc's default malloc behaviour)")
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return None  # an older glibc that refuses the values keeps its defaults
    return (f"CPU memory: freed blocks are kept for reuse (glibc mmap threshold 1 GiB; {ENV_VAR}=system turns "
            "this off)")


__all__ = ["ENV_VAR", "MallocSettingError", "keep_freed_memory"]
