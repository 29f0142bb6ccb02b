"""Vocabulary-parallel output layer and cross entropy (Megatron's fused parallel loss).

Under tensor parallelism the output layer is split along the (padded) vocabulary. Gathering its b x s x V logits
on every rank just to take a softmax is what Megatron avoids: each rank computes the max, the sum of exponentials
and the target's logit over its own slice, and only those b x s scalars are all-reduced.

PyTorch's `loss_parallel()` does the same but needs the backward pass to run inside its context manager, which a
training loop (Trainer, accelerate) does not do, so the loss here is an autograd function of its own.

The modeling files declare transformers' `colwise_gather_output` for their output layer (exact, and loadable without
megahf); `use_vocab_parallel_output` swaps in the sharded style and this loss when megahf distributes a model. The
columns past `vocab_size` (Megatron's padding) are left out of the softmax unless `padded_vocab_softmax`, exactly as
the model's own loss does, and the returned logits are the plain `[..., vocab_size]` tensor either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch import nn
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import ColwiseParallel
from transformers.utils import ModelOutput

from torch.distributed.fsdp import FSDPModule

from ..models.chunked_loss import (
    Collectives,
    check_targets,
    chunked_causal_lm_loss,
    linear_cross_entropy_sum,
    reduce_like_transformers,
    shifted_targets,
)
from ..models.padded_vocab import causal_lm_loss, masked_lm_loss

IGNORE_INDEX = -100

# A column split of the output layer that returns its logits as a vocabulary-sharded DTensor (transformers'
# "colwise" returns the local shard as a plain tensor, which loses the knowledge that it is a shard).
VOCAB_PARALLEL_OUTPUT = "megahf_vocab_parallel_output"
ALL_PARALLEL_STYLES.register(
    VOCAB_PARALLEL_OUTPUT,
    ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
)


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    return isinstance(logits, DTensor) and any(isinstance(p, Shard) for p in logits.placements)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of logits whose last dimension is split over `group`; rank r holds the columns
    [start, start + local), of which those below `vocab_size` take part in the softmax. Returns the loss of every
    token (identical on all ranks)."""

    @staticmethod
    def forward(ctx, local_logits, target, start, vocab_size, group):
        local = local_logits.shape[-1]
        padded = torch.arange(start, start + local, device=local_logits.device) >= vocab_size
        if padded.any():
            local_logits = local_logits.masked_fill(padded, float("-inf"))
        logits_max = local_logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = local_logits - logits_max.unsqueeze(-1)

        owned = (target >= start) & (target < start + local)
        local_target = (target - start).clamp(0, local - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * owned
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, owned)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, owned = ctx.saved_tensors
        grad = softmax.scatter_add(-1, local_target.unsqueeze(-1), -owned.to(softmax.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: DTensor, target: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-sharded logits [..., V] against `target` [...] (plain tensor), the
    softmax over the first `vocab_size` columns (all of them by default)."""
    mesh = logits.device_mesh
    if mesh.ndim != 1 or logits.placements[0] not in (Shard(logits.ndim - 1), Shard(-1)):
        raise ValueError(f"Expected logits sharded on the vocabulary over a 1-D mesh, got {logits.placements}.")
    if logits.shape[-1] % mesh.size():
        raise ValueError(
            f"The padded vocabulary ({logits.shape[-1]}) is not divisible by the tensor-parallel size "
            f"({mesh.size()}): raise make_vocab_size_divisible_by."
        )
    local = logits.to_local().float()
    start = mesh.get_local_rank() * local.shape[-1]
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    return _VocabParallelCrossEntropy.apply(local, target.to(local.device), start, vocab_size, mesh.get_group())


def _mean_over_labels(per_token, labels, num_items_in_batch, ignore_index):
    """transformers' reduction: the sum over kept labels, divided by their count or by `num_items_in_batch` (passed
    by Trainer under gradient accumulation)."""
    kept = labels != ignore_index
    total = (per_token * kept).sum()
    count = num_items_in_batch if num_items_in_batch is not None else kept.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def vocab_parallel_causal_lm_loss(logits, labels=None, vocab_size: int = 0, padded_vocab_softmax: bool = False,
                                  shift_labels=None, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                                  **kwargs):
    """`models.padded_vocab.causal_lm_loss` on vocabulary-sharded logits, without gathering them."""
    if not is_vocab_sharded(logits):
        return causal_lm_loss(logits, labels, vocab_size, padded_vocab_softmax, shift_labels=shift_labels,
                              num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    per_token = vocab_parallel_cross_entropy(logits, shift_labels, None if padded_vocab_softmax else vocab_size)
    return _mean_over_labels(per_token, shift_labels.to(per_token.device), num_items_in_batch, ignore_index)


def vocab_parallel_masked_lm_loss(logits, labels, vocab_size: int = 0, padded_vocab_softmax: bool = False,
                                  num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, **kwargs):
    """`models.padded_vocab.masked_lm_loss` on vocabulary-sharded logits, without gathering them."""
    if not is_vocab_sharded(logits):
        return masked_lm_loss(logits, labels, vocab_size, padded_vocab_softmax,
                              num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
    per_token = vocab_parallel_cross_entropy(logits, labels, None if padded_vocab_softmax else vocab_size)
    return _mean_over_labels(per_token, labels.to(per_token.device), num_items_in_batch, ignore_index)


class _GroupCollectives(Collectives):
    """The chunk loop's reductions over the tensor-parallel group (Megatron's all-reduces of the parallel loss)."""

    def __init__(self, group):
        self.group = group

    def max_(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)

    def sum_(self, tensor):
        dist.all_reduce(tensor, group=self.group)


def _gathered_output_layer(output_layer: nn.Module) -> nn.Module:
    """Under FSDP2 an output layer that is an FSDP unit of its own (an untied head, `keep_full_weight`) holds only
    its shard until its own forward runs, which the chunked loss skips: gather it now. It stays gathered for the
    backward pass (the unit does not reshard after forward), and FSDP2's end-of-backward callback reduce-scatters
    its gradient (that callback runs the post-backward of every unit whose forward outputs took no part in the
    backward pass)."""
    if isinstance(output_layer, FSDPModule):
        output_layer.unshard()
    return output_layer


def parallel_chunked_causal_lm_loss(hidden_states, output_layer, labels=None, vocab_size: int = 0,
                                    padded_vocab_softmax: bool = False, chunk_size: int = 1024, shift_labels=None,
                                    num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, **kwargs):
    """`models.chunked_loss.chunked_causal_lm_loss` on a distributed model: each rank runs the chunk loop on its
    vocabulary shard of the output layer, all-reducing per chunk the max, the sum of exponentials and the target's
    logit, and at the end the hidden states' gradient (the column-parallel layer's backward all-reduce). Only the
    `[chunk, V / tp]` logits of one chunk exist at a time on each rank."""
    output_layer = _gathered_output_layer(output_layer)
    weight = output_layer.weight
    if not (isinstance(weight, DTensor) and weight.placements[-1] == Shard(0)):
        return chunked_causal_lm_loss(hidden_states, output_layer, labels, vocab_size, padded_vocab_softmax,
                                      chunk_size, shift_labels, num_items_in_batch, ignore_index)
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"Expected the output layer sharded on the vocabulary over a 1-D mesh, got {mesh}.")
    if isinstance(hidden_states, DTensor):
        raise ValueError("The chunked loss expects replicated plain hidden states (no sequence parallelism).")
    target = shifted_targets(labels, shift_labels, ignore_index)
    classes = weight.shape[0] if padded_vocab_softmax else vocab_size
    check_targets(target, classes, ignore_index)
    local = weight.to_local()  # differentiable: the gradient comes back as this rank's shard of a DTensor
    start = mesh.get_local_rank() * local.shape[0]
    columns = max(0, min(local.shape[0], classes - start))
    total = linear_cross_entropy_sum(hidden_states, local, target, chunk_size, start=start, columns=columns,
                                     ignore_index=ignore_index, collectives=_GroupCollectives(mesh.get_group()))
    return reduce_like_transformers(total, target.to(total.device), num_items_in_batch, ignore_index)


_VOCAB_PARALLEL_LOSSES = {causal_lm_loss: vocab_parallel_causal_lm_loss, masked_lm_loss: vocab_parallel_masked_lm_loss}


def _plain_outputs(module, args, output):
    """The logits sliced to `vocab_size` from sharded ones are a replicated DTensor: hand back the plain tensor that
    a single process returns (one type and shape in every layout)."""
    if isinstance(output, ModelOutput):
        for key, value in output.items():
            if isinstance(value, DTensor):
                output[key] = value.to_local()
        return output
    if isinstance(output, tuple):
        return tuple(v.to_local() if isinstance(v, DTensor) else v for v in output)
    return output


def use_vocab_parallel_output(model: nn.Module) -> None:
    """Before tensor parallelism is applied: split the output layer along the vocabulary without gathering its
    logits, and compute the model's language-model loss on the shards. A model without an output layer in its plan
    (an encoder or a task head) is left alone."""
    plan = model._tp_plan or {}
    loss = _VOCAB_PARALLEL_LOSSES.get(getattr(type(model), "_loss_function", None))
    if "output_layer" not in plan or loss is None:
        return
    model._tp_plan = {**plan, "output_layer": VOCAB_PARALLEL_OUTPUT}
    model.loss_function = loss
    model.register_forward_hook(_plain_outputs)
