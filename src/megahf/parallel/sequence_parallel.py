"""Megatron's sequence parallelism (Korthikanti et al. 2022) as a variant of the tensor-parallel plan.

Under plain TP every rank holds the whole [batch, seq, hidden] residual stream between the column- and row-parallel
layers, and runs the norms and dropouts on it redundantly. Under sequence parallelism each rank holds 1/tp of the
sequence there instead:

    shard -> norm -> all-gather -> linear_qkv (colwise) ... linear_proj (rowwise) -> reduce-scatter -> dropout + residual
    shard -> norm -> all-gather -> linear_fc1 (colwise) ... linear_fc2 (rowwise) -> reduce-scatter -> dropout + residual

The all-reduce of plain TP becomes a reduce-scatter and an all-gather (the same traffic), and the norm and dropout
activations shrink by tp. The column-parallel layers keep only their input shard for the backward pass and gather it
again there (Megatron's `LinearWithGradAccumulationAndAsyncCommunication`), so their saved input shrinks too.
Parameters used on the shards (norms, row-parallel biases) get a partial gradient on each rank, summed over the TP
group in the backward pass. The embedding output is cut into shards at its dropout; the output layer gathers the
final norm's shards and the vocabulary-parallel loss takes its logits as under TP; a model without an output layer
(BERT, whose pooler reads [CLS], and every body on its own) gathers the sequence after its last norm.

Why not transformers' `sequence_parallel` style with `colwise` taking `Shard(1)` input: there the column-parallel
linear keeps the gathered whole sequence for its backward pass (the paper's saving on those inputs is lost), the
norm parameters become DTensors whose partial gradients the optimizer and clipping would have to reconcile, and the
plain-TP fallback for eval mode is missing. So each style here is a subclass of transformers' own (sharding its
parameters the same way) whose training-mode forward is a small autograd function on local tensors.

The styles below are registered with transformers' style registry; `sequence_parallel_plan(model)` maps the model's
TP plan onto them. Sequence parallelism applies in training mode; in eval mode (validation, generation) every style
falls back to its plain-TP form, so decoding one token at a time works. Dropout in the sequence shards draws from
each rank's own stream (`rng.py`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn import functional as F
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import ColwiseParallel, RowwiseParallel, TensorParallelLayer

from .rng import get_rng_tracker

SEQ_DIM = 1  # [batch, seq, hidden] everywhere in megahf's models


class SequenceParallelError(ValueError):
    """An input that sequence parallelism cannot split (its length does not divide by the TP size)."""


# ---------------------------------------------------------------------- collectives along the sequence


def _check_divisible(x: torch.Tensor, group) -> int:
    size = dist.get_world_size(group)
    if x.shape[SEQ_DIM] % size:
        raise SequenceParallelError(
            f"sequence_parallel: the sequence length {x.shape[SEQ_DIM]} is not divisible by tensor_parallel_size="
            f"{size}; use a seq_length that is a multiple of {size} (or pad the batch to one)."
        )
    return size


def _own_chunk(x: torch.Tensor, group) -> torch.Tensor:
    size = _check_divisible(x, group)
    return x.chunk(size, dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: the all-reduce's own chunk is the same sum
        x = x.clone()
        dist.all_reduce(x, group=group)
        return _own_chunk(x, group)
    size = _check_divisible(x, group)
    chunks = [c.contiguous() for c in x.chunk(size, dim=SEQ_DIM)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _Scatter(torch.autograd.Function):
    """Replicated -> this rank's sequence shard; the backward gathers the shards' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    """Sequence shards -> the whole sequence on every rank, for replicated computation after it (whose gradient is
    then the same on every rank: the backward keeps this rank's part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Partial sums of a row-parallel layer -> this rank's sequence shard of their total."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity; the backward sums the gradient over the group (a replicated parameter used on sequence shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherLinear(torch.autograd.Function):
    """A column-parallel linear fed from sequence shards: all-gather, then the local matmul. Only the shard is kept
    for the backward pass, which gathers it again (the paper's saving on the inputs of the column-parallel layers)
    and reduce-scatters the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _reduce_scatter(grad_out.matmul(weight), ctx.group)
        if ctx.needs_input_grad[1]:
            full = _all_gather(x, ctx.group)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(full.reshape(-1, full.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


def _local(param: torch.Tensor | None) -> torch.Tensor | None:
    return param.to_local() if isinstance(param, DTensor) else param


def _tp_group(mesh):
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


@contextlib.contextmanager
def _params_summed_over(module: nn.Module, group):
    """Inside the block the module's parameters are the identity of themselves whose gradient is summed over the TP
    group (its input is this rank's shard only)."""
    saved = dict(module._parameters)
    for name, param in saved.items():
        if param is not None and param.requires_grad:
            module._parameters[name] = _SumGradOverGroup.apply(param, group)
    try:
        yield
    finally:
        module._parameters.update(saved)


# ---------------------------------------------------------------------- styles


class SequenceParallelColwise(ColwiseParallel):
    """`colwise` fed from sequence shards: gather them inside the linear (training); `colwise` in eval mode."""

    def install_forward(self, module, mesh):
        super().install_forward(module, mesh)
        tp_forward, group = module.forward, _tp_group(mesh)

        def forward(x, *args, **kwargs):
            if not module.training:
                return tp_forward(x, *args, **kwargs)
            out = _GatherLinear.apply(x, _local(module.weight), _local(module.bias), group)
            return out if self.use_local_output else self._from_local_last_dim_shard(out, mesh, module.out_features)

        module.forward = forward
        return module


class SequenceParallelRowwise(RowwiseParallel):
    """`rowwise` that reduce-scatters its partial sums along the sequence (training); `rowwise` in eval mode."""

    def install_forward(self, module, mesh):
        super().install_forward(module, mesh)
        tp_forward, group = module.forward, _tp_group(mesh)

        def forward(x, *args, **kwargs):
            if not module.training:
                return tp_forward(x, *args, **kwargs)
            out = _ReduceScatter.apply(F.linear(x, _local(module.weight)), group)
            if module.bias is not None:
                out = out + _SumGradOverGroup.apply(_local(module.bias), group)
            return out

        module.forward = forward
        return module


class SequenceParallelNorm(TensorParallelLayer):
    """A norm on sequence shards (training): replicated parameters whose gradients are summed over the TP group;
    with `gather_output` the whole sequence is gathered after it (the end of a body without an output layer)."""

    def __init__(self, gather_output: bool = False):
        self.gather_output = gather_output

    def install_forward(self, module, mesh):
        original, group = module.forward, _tp_group(mesh)

        def forward(x, *args, **kwargs):
            if not module.training:
                return original(x, *args, **kwargs)
            with _params_summed_over(module, group):
                out = original(x, *args, **kwargs)
            return _Gather.apply(out, group) if self.gather_output else out

        module.forward = forward
        return module


class SequenceParallelDropout(TensorParallelLayer):
    """Dropout on sequence shards (training), from this rank's RNG stream; with `scatter_input` its replicated input
    is cut into this rank's shard first (where the embeddings enter the sequence-parallel region)."""

    def __init__(self, scatter_input: bool = False):
        self.scatter_input = scatter_input

    def install_forward(self, module, mesh):
        original, group = module.forward, _tp_group(mesh)

        def forward(x, *args, **kwargs):
            if not module.training:
                return original(x, *args, **kwargs)
            if self.scatter_input:
                x = _Scatter.apply(x, group)
            with get_rng_tracker().fork():
                return original(x, *args, **kwargs)

        module.forward = forward
        return module


class ModelParallelRNG(TensorParallelLayer):
    """Run the module (the attention block: its dropout acts on this rank's heads) on this rank's RNG stream in
    training mode. Used under tensor parallelism with or without sequence parallelism."""

    def install_forward(self, module, mesh):
        original = module.forward

        def forward(*args, **kwargs):
            if not module.training:
                return original(*args, **kwargs)
            with get_rng_tracker().fork():
                return original(*args, **kwargs)

        module.forward = forward
        return module


SP_COLWISE = "megahf_sp_colwise"
SP_ROWWISE = "megahf_sp_rowwise"
SP_NORM = "megahf_sp_norm"
SP_NORM_GATHER = "megahf_sp_norm_gather"
SP_DROPOUT = "megahf_sp_dropout"
SP_SCATTER_DROPOUT = "megahf_sp_scatter_dropout"
SP_VOCAB_PARALLEL_OUTPUT = "megahf_sp_vocab_parallel_output"
TP_RNG = "megahf_model_parallel_rng"

ALL_PARALLEL_STYLES.register(SP_COLWISE, SequenceParallelColwise(input_layouts=Replicate(), output_layouts=Shard(-1)))
ALL_PARALLEL_STYLES.register(SP_ROWWISE, SequenceParallelRowwise(input_layouts=Shard(-1), output_layouts=Replicate()))
ALL_PARALLEL_STYLES.register(SP_NORM, SequenceParallelNorm())
ALL_PARALLEL_STYLES.register(SP_NORM_GATHER, SequenceParallelNorm(gather_output=True))
ALL_PARALLEL_STYLES.register(SP_DROPOUT, SequenceParallelDropout())
ALL_PARALLEL_STYLES.register(SP_SCATTER_DROPOUT, SequenceParallelDropout(scatter_input=True))
# The output layer: vocabulary-sharded logits as a DTensor for the vocabulary-parallel loss (vocab_parallel.py).
ALL_PARALLEL_STYLES.register(SP_VOCAB_PARALLEL_OUTPUT, SequenceParallelColwise(
    input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False))
ALL_PARALLEL_STYLES.register(TP_RNG, ModelParallelRNG())


# ---------------------------------------------------------------------- plans


def _body(model) -> tuple[str, nn.Module]:
    """The key prefix of the base model's modules in the model's plan, and the base model."""
    base = model.base_model
    return ("" if base is model else f"{model.base_model_prefix}."), base


def model_parallel_rng_plan(model) -> dict[str, str]:
    """Under tensor parallelism: each attention block's dropout draws from the rank's own stream (its heads)."""
    prefix, base = _body(model)
    stack = "decoder" if hasattr(base, "decoder") else "encoder"
    return {f"{prefix}{stack}.layers.*.self_attention": TP_RNG}


def check_sequence_parallel(model) -> None:
    """Refuse a model the plan does not cover, before anything is sharded."""
    order = getattr(model.config, "layernorm_order", "pre")
    if order != "pre":
        raise ValueError(f"sequence parallelism needs the pre-LayerNorm order (Megatron's), got layernorm_order="
                         f"{order!r}: set layernorm_order='pre' or turn sequence_parallel off.")


def sequence_parallel_plan(model) -> dict[str, str]:
    """The sequence-parallel rules for `model` (full keys, `*` for the layer), to merge over its TP plan: colwise and
    rowwise layers become their sequence-parallel forms, the norms and dropouts between them run on the shards, the
    embedding dropout cuts the sequence, and the sequence is gathered by the output layer (or after the last norm)."""
    prefix, base = _body(model)
    stack = "decoder" if hasattr(base, "decoder") else "encoder"
    layers = f"{prefix}{stack}.layers"
    plan = {name: {"colwise": SP_COLWISE, "rowwise": SP_ROWWISE}[style]
            for name, style in model.tp_plan.items() if style in ("colwise", "rowwise")}
    plan[f"{prefix}embedding.embedding_dropout"] = SP_SCATTER_DROPOUT
    plan[f"{layers}.*.hidden_dropout"] = SP_DROPOUT
    plan.update({f"{layers}.*.{norm}": SP_NORM for norm in ("input_layernorm", "pre_mlp_layernorm")})
    # A chunked training loss (`loss_chunk_size`, where the model has it) reads the output layer's weight itself, not
    # through its forward: the sequence is gathered after the final norm for it, as for a body on its own.
    chunked = getattr(model.config, "loss_chunk_size", 0) and hasattr(model, "chunked_loss_function")
    has_output_layer = "output_layer" in model.tp_plan and stack == "decoder" and not chunked
    plan[f"{prefix}{stack}.final_layernorm"] = SP_NORM if has_output_layer else SP_NORM_GATHER
    if has_output_layer:
        plan["output_layer"] = SP_VOCAB_PARALLEL_OUTPUT
    return plan


__all__ = ["SequenceParallelError", "check_sequence_parallel", "model_parallel_rng_plan", "sequence_parallel_plan"]
