"""`compile: true`: torch.compile of each transformer layer.

The layer is the unit that FSDP2 shards (`decoder.layers.*` in the FSDP plan) and that activation checkpointing
recomputes (a `GradientCheckpointingLayer`), so compiling it composes with both: only the layer's `forward` is
compiled, and the hooks around it (FSDP2's gather and reshard, checkpointing, transformers' output capture) stay
eager. Each layer compiles once on the first training step (the layers share one shape, so inductor's cache serves
the others); the embedding, the final norm and the loss stay eager. Evaluation and generation (the layer in eval
mode) run the eager forward: their shapes change at every decoding step and would recompile again and again.

Dropout draws its masks from inductor's generator in a compiled layer: the same distribution as eager, not the same
masks. With dropout 0 a compiled run gives the eager run's losses (tested to 1e-5).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_layers(model: nn.Module) -> int:
    """Make every transformer layer of `model` run its torch.compile'd forward in training mode; the number of
    layers. Call it after the model is sharded (tensor parallelism, FSDP2) and before training."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        # A method bound to the layer (not a closure over it): a deepcopy of the model binds it to the copy.
        layer.forward = types.MethodType(_compiled_forward, layer)
    return len(layers)


_COMPILED: dict = {}  # a layer class's forward -> its compiled version, shared by every layer of that class


def _compiled_forward(self, *args, **kwargs):
    forward = type(self).forward  # FSDP2 subclasses the layer's class; the forward is the model's own
    if not self.training:
        return forward(self, *args, **kwargs)
    if forward not in _COMPILED:
        _COMPILED[forward] = torch.compile(forward)
    return _COMPILED[forward](self, *args, **kwargs)


def is_compiled(layer: nn.Module) -> bool:
    return getattr(layer.forward, "__func__", None) is _compiled_forward


__all__ = ["compile_layers", "is_compiled"]
