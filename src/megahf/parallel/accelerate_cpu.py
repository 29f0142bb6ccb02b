"""Let accelerate's `ParallelismConfig` run on CPU processes (gloo), so a tensor-parallel model trains there.

transformers' Trainer builds `ParallelismConfig(tp_size=..., dp_shard_size=...)` for a model sharded with
`DistributedConfig`, and accelerate 1.15 then refuses it unless the processes are GPUs (or FSDP2 / DeepSpeed):
`ParallelismConfig._validate_accelerator` raises "only compatible DistributedType.FSDP ... got MULTI_CPU". Nothing
else in that path needs a GPU: the device mesh builds on "cpu" with gloo and TP trains exactly (tests/distributed).

`allow_parallelism_config_on_cpu()` relaxes that one check for `DistributedType.MULTI_CPU` and leaves every other
check as it is. Drop this file once accelerate accepts MULTI_CPU in `_validate_accelerator` (re-check on upgrade:
tests/test_accelerate_cpu.py fails when the patch is no longer needed).
"""

from __future__ import annotations

from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import DistributedType

_ORIGINAL = ParallelismConfig._validate_accelerator


class _AsMultiDevice:
    """The accelerator as `_validate_accelerator` should see it: a multi-process CPU run counts as multi-device."""

    def __init__(self, accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name):
        if name == "multi_device":
            return True
        return getattr(self._accelerator, name)


def _validate_accelerator_allowing_cpu(self: ParallelismConfig, accelerator) -> None:
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator = _AsMultiDevice(accelerator)
    return _ORIGINAL(self, accelerator)


def allow_parallelism_config_on_cpu() -> None:
    """Install the relaxed check (idempotent)."""
    ParallelismConfig._validate_accelerator = _validate_accelerator_allowing_cpu


def is_patched() -> bool:
    return ParallelismConfig._validate_accelerator is _validate_accelerator_allowing_cpu


__all__ = ["allow_parallelism_config_on_cpu", "is_patched"]
