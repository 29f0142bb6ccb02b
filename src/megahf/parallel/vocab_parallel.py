"""Vocabulary-parallel output layer and cross entropy (Megatron's fused parallel loss).

Under tensor parallelism the output layer is split along the (padded) vocabulary. Gathering its b x s x V logits
on every rank just to take a softmax is what Megatron avoids: each rank computes the max, the sum of exponentials
and the target's logit over its own slice, and only those b x s scalars are all-reduced.

PyTorch's `loss_parallel()` does the same but needs the backward pass to run inside its context manager, which a
training loop (Trainer, accelerate) does not do, so the loss here is an autograd function of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn import functional as F
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import ColwiseParallel

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
    [start, start + local). Returns the loss of every token (identical on all ranks)."""

    @staticmethod
    def forward(ctx, local_logits, target, start, group):
        local = local_logits.shape[-1]
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
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: DTensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-sharded logits [..., V] against `target` [...] (plain tensor)."""
    mesh = logits.device_mesh
    if mesh.ndim != 1 or logits.placements[0] != Shard(logits.ndim - 1) and logits.placements[0] != Shard(-1):
        raise ValueError(f"Expected logits sharded on the vocabulary over a 1-D mesh, got {logits.placements}.")
    if logits.shape[-1] % mesh.size():
        raise ValueError(
            f"The padded vocabulary ({logits.shape[-1]}) is not divisible by the tensor-parallel size "
            f"({mesh.size()}): raise make_vocab_size_divisible_by."
        )
    local = logits.to_local().float()
    start = mesh.get_local_rank() * local.shape[-1]
    return _VocabParallelCrossEntropy.apply(local, target, start, mesh.get_group())


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross entropy of `logits` [..., V] against `labels` [...] over the labels that are not `ignore_index`
    (masked LM, or causal LM once shifted). `num_items_in_batch`, passed by Trainer under gradient accumulation,
    replaces this micro-batch's count as the denominator. Plain logits and vocabulary-sharded DTensor logits give
    the same value and gradients."""
    labels = labels.to(logits.device)
    if is_vocab_sharded(logits):
        per_token = vocab_parallel_cross_entropy(logits, labels)
    else:
        per_token = F.cross_entropy(
            logits.float().flatten(0, -2), labels.flatten(), reduction="none", ignore_index=ignore_index
        ).view(labels.shape)
    kept = labels != ignore_index
    total = (per_token * kept).sum()
    count = num_items_in_batch if num_items_in_batch is not None else kept.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    **kwargs,
) -> torch.Tensor:
    """Mean next-token cross entropy: `labels` are aligned with the inputs and shifted here (transformers'
    convention); `shift_labels` are already shifted (Megatron's)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return token_cross_entropy(logits, shift_labels, num_items_in_batch, ignore_index)


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, keep_sharded: bool = False) -> torch.Tensor:
    """Full logits over the real vocabulary (the padded columns dropped). With `keep_sharded`, sharded logits
    are returned as they are: training only needs the loss, and gathering b x s x V is what TP saves."""
    if is_vocab_sharded(logits):
        if keep_sharded:
            return logits
        logits = logits.full_tensor()
    elif isinstance(logits, DTensor):
        logits = logits.to_local()
    return logits[..., :vocab_size]
