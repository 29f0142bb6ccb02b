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

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_layers(model: nn.Module) -> int:
    """Replace the `forward` of every transformer layer of `model` by its torch.compile'd version; the number of
    layers compiled. Call it after the model is sharded (tensor parallelism, FSDP2) and before training."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = _training_only(layer, torch.compile(layer.forward), layer.forward)
    return len(layers)


def _training_only(layer: nn.Module, compiled, eager):
    def forward(*args, **kwargs):
        return (compiled if layer.training else eager)(*args, **kwargs)

    forward.compiled = compiled  # for tests and introspection
    return forward


__all__ = ["compile_layers"]
