"""Parallel layouts from recipe keys: sizes checked against the world size, heads and batch before anything runs;
the one accelerate workaround that lets tensor parallelism train on CPU processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import DistributedType

from megahf.parallel import accelerate_cpu
from megahf.parallel.layout import LayoutError, resolve_layout
from megahf.training import RecipeError, load_recipe
from megahf.training.setup import build_layout


def test_sizes_are_derived():
    layout = resolve_layout(world_size=8, tensor_parallel_size=2, fsdp_size=2, micro_batch_size=4,
                            global_batch_size=64)
    assert (layout.data_parallel_size, layout.replicas, layout.gradient_accumulation_steps) == (4, 2, 4)
    assert layout.global_batch_size == 64 and layout.sharded
    config = layout.distributed_config()
    assert (config.tp_size, config.fsdp_size, config.dp_replicate_size) == (2, 2, 2)
    plain = resolve_layout(world_size=2, micro_batch_size=4)
    assert plain.gradient_accumulation_steps == 1 and plain.global_batch_size == 8
    assert not plain.sharded and plain.distributed_config() is None
    assert "DDP replicas 2" in plain.describe()


@pytest.mark.parametrize("kwargs, message", [
    ({"world_size": 3, "tensor_parallel_size": 2},
     r"world size 3 is not a multiple of tensor_parallel_size=2; launch a multiple of 2 processes"),
    ({"world_size": 4, "tensor_parallel_size": 2, "data_parallel_size": 4},
     r"data_parallel_size=4 does not fit 4 processes at tensor_parallel_size=2 .*set data_parallel_size to 2"),
    ({"world_size": 6, "fsdp_size": 4}, r"fsdp_size=4 does not divide the data-parallel size 6"),
    ({"world_size": 2, "micro_batch_size": 4, "global_batch_size": 12},
     r"global_batch_size=12 is not a multiple of micro_batch_size=4 x data-parallel size 2 = 8"),
    ({"world_size": 2, "micro_batch_size": 4, "global_batch_size": 16, "gradient_accumulation_steps": 3},
     r"global_batch_size=16 != micro_batch_size=4 x data-parallel size 2 x gradient_accumulation_steps=3; set "
     r"gradient_accumulation_steps to 2"),
])
def test_layouts_that_do_not_fit_name_key_value_and_fix(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        resolve_layout(**kwargs)


def test_recipe_refuses_layouts_before_anything_runs():
    with pytest.raises(RecipeError, match=r"tensor_parallel_size=3 does not fit model='gpt-tiny': "
                                          r"num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        load_recipe(None, ["--tensor_parallel_size", "3"])
    with pytest.raises(RecipeError, match=r"global_batch_size=10 is invalid: it must be a multiple of "
                                          r"micro_batch_size=4"):
        load_recipe(None, ["--micro_batch_size", "4", "--global_batch_size", "10"])
    with pytest.raises(RecipeError, match=r"'fsdp_size' on the command line .*must be an integer, got 'two'"):
        load_recipe(None, ["--fsdp_size", "two"])
    recipe = load_recipe(None, ["--tensor_parallel_size", "2", "--micro_batch_size", "2", "--global_batch_size", "8"])
    with pytest.raises(RecipeError, match=r"world size 1 is not a multiple of tensor_parallel_size=2"):
        build_layout(recipe, 1)
    assert build_layout(recipe, 4).gradient_accumulation_steps == 2


def _cpu_accelerator(num_processes: int = 2):
    """What `_validate_accelerator` reads of an accelerator started by `ACCELERATE_USE_CPU=true torchrun`."""
    return SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, multi_device=False,
                           num_processes=num_processes, is_fsdp2=False, is_main_process=True)


def test_parallelism_config_is_allowed_on_cpu_processes(monkeypatch):
    monkeypatch.setattr(ParallelismConfig, "_validate_accelerator", accelerate_cpu._ORIGINAL)
    # Upstream still refuses: when this stops raising, delete megahf/parallel/accelerate_cpu.py.
    with pytest.raises(ValueError, match="MULTI_CPU"):
        ParallelismConfig(tp_size=2)._validate_accelerator(_cpu_accelerator())
    accelerate_cpu.allow_parallelism_config_on_cpu()
    assert accelerate_cpu.is_patched()
    ParallelismConfig(tp_size=2)._validate_accelerator(_cpu_accelerator())
    # Only that check is relaxed: a size that does not match the processes is still refused.
    with pytest.raises(ValueError, match=r"total_size \(4\) does not match num_processes \(2\)"):
        ParallelismConfig(tp_size=4)._validate_accelerator(_cpu_accelerator())
