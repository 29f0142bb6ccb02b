"""A checkpoint's weights loaded straight into a sharded model: each rank reads only the blocks it keeps.

    model = load_into_layout(MegatronGPTForCausalLM, config, tensors, distributed_config)

The model is built without weights (parameters on the meta device, no random init; buffers computed as at
construction, such as RoPE's inverse frequencies), sharded as the layout says by the same `distribute_model` that
shards a freshly initialised model (tensor parallel x FSDP2), given empty storage for its local shards only, and each
parameter's local shard is filled with its block of the checkpoint's tensor: `tensors[name].read(block)`, a
safetensors slice where the checkpoint allows it. A rank's peak memory is its shards plus the largest block it reads;
no rank holds the whole model. The loaded model equals the checkpoint exactly (the blocks are copied, in the
parameter's dtype: bf16 weights are exact in float32).

`tensors` maps every parameter name of the model (a tied output layer left out: it is the embedding) to an object
with `shape` and `read(block)`, `block` being one slice per dimension (megahf.convert's `TensorRef`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import PreTrainedModel

from ..errors import MegahfError
from .distribute import distribute_model


class ShardLoadError(MegahfError, ValueError):
    """The checkpoint's tensors do not fit the model they are loaded into (the message names the tensor)."""


def local_block(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's local tensor of a parameter and the block of the whole parameter it holds."""
    if isinstance(param, DTensor):
        # DTensor's own bookkeeping (what torch.distributed.checkpoint plans its reads with): TP's shards, FSDP2's
        # shards of them (torch.chunk sizes, the padding left out), replicas
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        if tuple(local.shape) != tuple(shape):
            raise ShardLoadError(f"a shard of {tuple(param.shape)} holds {tuple(local.shape)}, not the {shape} its "
                                 f"placements {param.placements} give")
        return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return param, tuple(slice(0, n) for n in param.shape)


def _local_device(model: torch.nn.Module) -> torch.device:
    """Where this rank's shards live: the device of its mesh (a GPU under NCCL), else the CPU (an unsharded model is
    moved by Trainer)."""
    for param in model.parameters():
        if isinstance(param, DTensor) and param.device_mesh.device_type != "cpu":
            device_type = param.device_mesh.device_type
            return torch.device(device_type, torch.get_device_module(device_type).current_device())
    return torch.device("cpu")


@torch.no_grad()
def load_into_layout(model_class: type[PreTrainedModel], config, tensors: Mapping[str, Any],
                     distributed_config=None) -> PreTrainedModel:
    """`model_class(config)` holding the checkpoint `tensors`, sharded by `distributed_config` (None: whole, on the
    CPU). Every rank calls it; each reads its own blocks."""
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    if distributed_config is not None:
        model = distribute_model(model, distributed_config)
    computed = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=_local_device(model))
    for name, buffer in model.named_buffers():
        buffer.copy_(tensors[name].read(tuple(slice(0, n) for n in buffer.shape)) if name in tensors
                     else computed[name])
    if distributed_config is None and config.tie_word_embeddings:
        model.tie_weights()  # to_empty gives each module its own new storage
    params = dict(model.named_parameters())  # a tied output layer is the embedding's parameter, listed once
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params) - {name for name, _ in model.named_buffers()})
    if missing or unexpected:
        raise ShardLoadError(f"the checkpoint does not fit {model_class.__name__}: no tensor for {missing[:5]}, "
                             f"no parameter for {unexpected[:5]}")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ShardLoadError(f"{name}: the checkpoint's tensor is {list(tensors[name].shape)}, the model's "
                                 f"parameter {list(param.shape)}")
        local, block = local_block(param)
        local.copy_(tensors[name].read(block))
    return model


__all__ = ["ShardLoadError", "load_into_layout", "local_block"]
