"""The output layer and the language-model cross entropy in one, chunk by chunk over the tokens.

The plain path holds the `[tokens, vocabulary]` logits several times over (the matmul's output, its float32 copy,
the log-softmax kept for backward): at sequence 1024, batch 8 and GPT-2's 50k vocabulary that is 1.6 GB per copy in
float32. Here the logits of at most `chunk_size` tokens exist at any time. Each chunk's gradients with respect to the
hidden states and to the weight are computed in the same forward loop (softmax - one-hot, two matmuls), so backward
only scales them by the incoming gradient: the same three matmuls as the plain forward + backward, and what is kept
for backward is the size of the hidden states and of the weight, not of the logits.

The loss is exactly `padded_vocab.causal_lm_loss` of `hidden @ weight.T`: softmax over the first `vocab_size` rows
of the weight (all rows with `padded_vocab_softmax`), labels shifted inside (or `shift_labels`), -100 ignored, the
mean over kept labels or the sum divided by `num_items_in_batch`. BERT's masked-LM loss (`chunked_masked_lm_loss`)
runs the same loop on its labeled positions, with the output layer's bias.

Pure torch, no parallelism, so that the file loads as Hub remote code. Under tensor parallelism `megahf.parallel`
runs the same loop on each rank's vocabulary shard, passing `collectives` that all-reduce the per-token max, sum of
exponentials and target logit (Megatron's parallel cross entropy) and the hidden states' gradient.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no parameter can be a DTensor
    DTensor = ()

IGNORE_INDEX = -100


class Collectives:
    """What the chunk loop reduces across the ranks that hold the other vocabulary shards: nothing in one process."""

    def max_(self, tensor: torch.Tensor) -> None:  # in place, elementwise max over the ranks
        pass

    def sum_(self, tensor: torch.Tensor) -> None:  # in place, elementwise sum over the ranks
        pass


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens t with target[t] != ignore_index of
    cross_entropy(hidden[t] @ weight[:columns].T (+ bias[:columns]), target[t]).

    `hidden` [N, H], `weight` [R, H] (this rank's rows of the output layer), `bias` [R] or None (BERT's output layer
    has one), `target` [N] (global vocabulary ids),
    `start`: the global id of `weight[0]`; `columns`: how many of its rows take part in the softmax (the others are
    padding, left out)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, start: int, columns: int, chunk_size: int, ignore_index: int,
                collectives: Collectives):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        real = weight[:columns]
        tokens = hidden.shape[0]
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulator: the weight's gradient sums over every chunk (bf16 partial sums would lose bits). The
        # first chunk writes it, the others add to it; only the padding rows, which no chunk writes, are zeroed.
        grad_weight = None
        if need_weight:
            grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            (grad_weight if tokens == 0 else grad_weight[columns:]).zero_()
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        # One chunk's logits buffer, reused by every chunk: a fresh [chunk, vocabulary] tensor per chunk costs more
        # than the elementwise work on it (each large allocation is new memory the kernel must fault in). In a
        # 16-bit dtype the matmul writes `scores`, its float32 copy goes to `work`, and the gradient of the logits
        # goes back into `scores` in the input dtype.
        rows = min(chunk_size, tokens)
        # One process holding every row of the softmax, on a CPU: torch's softmax in place (_softmax_in_place). On
        # a GPU, where passes over memory cost far less, the general path stays (its in-place use is CPU-tested).
        whole_rows = type(collectives) is Collectives and hidden.device.type == "cpu"
        scores = torch.empty(rows, columns, dtype=hidden.dtype, device=hidden.device)
        work = scores if hidden.dtype == torch.float32 else torch.empty(rows, columns, device=hidden.device)
        for begin in range(0, tokens, chunk_size):
            end = min(begin + chunk_size, tokens)
            h, t = hidden[begin:end], target[begin:end]
            logits = work[: end - begin]
            if bias is None:
                torch.matmul(h, real.T, out=scores[: end - begin])
            else:
                torch.addmm(bias[:columns], h, real.T, out=scores[: end - begin])
            if work is not scores:  # float32 softmax, as transformers' loss upcasts the logits
                logits.copy_(scores[: end - begin])
            owned = (t >= start) & (t < start + columns)
            local_t = (t - start).clamp(0, max(columns - 1, 0)).unsqueeze(-1)
            kept = (t != ignore_index).to(torch.float32)
            if whole_rows:
                probs, one_hot, scale = _softmax_in_place(logits, local_t, owned, kept, losses[begin:end], h, real,
                                                          None if bias is None else bias[:columns])
            else:
                probs, one_hot, scale = _softmax_across_shards(logits, local_t, owned, kept, losses[begin:end],
                                                               collectives)
            if need_hidden or need_weight or need_bias:
                # d loss / d logits = (probs - one-hot) * scale, the one-hot taken off in place of the logits. In
                # float32 the per-token scale goes to the [chunk, hidden] operand and result of the two matmuls
                # rather than over the [chunk, vocabulary] logits; in a 16-bit dtype it is applied before the cast
                # (one rounding, as the plain loss does; in place, then copied: a multiplication writing the 16-bit
                # buffer directly would allocate a float32 temporary of the chunk's size).
                probs.scatter_add_(-1, local_t, -one_hot.unsqueeze(-1))
                if work is scores:
                    grad_logits, row_scale = probs, scale.unsqueeze(-1)
                else:
                    probs *= scale.unsqueeze(-1)
                    grad_logits, row_scale = scores[: end - begin].copy_(probs), None
                if need_hidden:
                    torch.matmul(grad_logits, real, out=grad_hidden[begin:end])
                    if row_scale is not None:
                        grad_hidden[begin:end] *= row_scale
                if need_bias and row_scale is None:  # the logits' gradient summed over the tokens
                    grad_bias[:columns] += grad_logits.sum(dim=0, dtype=torch.float32)
                elif need_bias:
                    grad_bias[:columns].addmv_(grad_logits.T, row_scale.squeeze(-1))
                if need_weight:
                    operand = h if row_scale is None else h * row_scale
                if need_weight and grad_weight.dtype == h.dtype:  # accumulate in place: no [R, H] temporary
                    if begin == 0:
                        torch.mm(grad_logits.T, operand, out=grad_weight[:columns])
                    else:
                        grad_weight[:columns].addmm_(grad_logits.T, operand)
                elif need_weight:  # a 16-bit chunk product, added to the float32 accumulator (no name keeps it)
                    if begin == 0:
                        grad_weight[:columns].copy_(grad_logits.T @ operand)
                    else:
                        grad_weight[:columns] += grad_logits.T @ operand
        del scores, work
        if need_hidden:
            collectives.sum_(grad_hidden)  # every vocabulary shard contributes to each hidden state's gradient
        # Kept on ctx rather than saved: backward scales them in place (a weight-sized copy less at the peak) and
        # hands them over, so a second backward through the same graph is refused.
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                     None if grad_bias is None else grad_bias.to(bias.dtype))
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("The chunked loss's gradients were already used: it supports one backward pass "
                               "(retain_graph=True is not supported; set loss_chunk_size=0 for that).")
        grads, ctx.grads = ctx.grads, None
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _softmax_in_place(logits, local_t, owned, kept, losses, hidden, weight, bias):
    """The chunk's softmax where one process holds every row of it: torch's softmax, in place, does the max, the
    exponentials, their sum and the scaling row by row while the row is in cache, where `_softmax_across_shards`
    makes four passes over the whole chunk (on a CPU each pass over memory costs as much as a fifth of the output
    layer's matmul). The loss is -log p(target); a target probability below float32's smallest normal number (a
    loss above 87, where the logarithm would lose digits or be infinite) is recomputed from its row's logits,
    `hidden @ weight.T + bias`, exactly as the plain loss computes it.

    Writes `losses` (0 for ignored tokens); returns the probabilities (`logits`' storage), the one-hot's weight and
    the per-token scale of the gradient (`kept`: the probabilities are normalised already)."""
    probs = torch.softmax(logits, dim=-1, out=logits)
    p_target = probs.gather(-1, local_t).squeeze(-1)
    counted = kept.bool()
    losses.copy_(torch.where(counted, -p_target.log(), 0.0))
    lost = counted & (p_target < torch.finfo(torch.float32).tiny)
    if lost.any():
        rows = lost.nonzero().squeeze(-1)
        exact = (hidden[rows] @ weight.T if bias is None else torch.addmm(bias, hidden[rows], weight.T)).float()
        losses[rows] = exact.logsumexp(dim=-1) - exact.gather(-1, local_t[rows]).squeeze(-1)
    return probs, owned.to(torch.float32), kept


def _softmax_across_shards(logits, local_t, owned, kept, losses, collectives: Collectives):
    """The chunk's softmax where other ranks may hold other rows of it (Megatron's vocabulary-parallel cross
    entropy): the per-token max, target logit and sum of exponentials are reduced across the ranks.

    Writes `losses` (0 for ignored tokens); returns exp(logits - max) (`logits`' storage, not normalised), the
    one-hot's weight (sum_exp, for owned targets) and the per-token scale of the gradient (kept / sum_exp)."""
    columns = logits.shape[-1]
    if columns:
        logits_max = logits.amax(dim=-1)  # amax: max without the indices, three times faster on a CPU
    else:  # a rank whose whole shard is padding
        logits_max = torch.full(logits.shape[:1], float("-inf"), device=logits.device)
    collectives.max_(logits_max)
    logits -= logits_max.unsqueeze(-1)
    target_logit = (logits.gather(-1, local_t).squeeze(-1) * owned) if columns else torch.zeros_like(logits_max)
    collectives.sum_(target_logit)
    probs = logits.exp_()
    sum_exp = probs.sum(dim=-1)
    collectives.sum_(sum_exp)
    losses.copy_((sum_exp.log() - target_logit) * kept)
    return probs, owned * sum_exp, kept / sum_exp


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under autocast the output layer's matmul runs in the autocast dtype: cast the inputs as autocast would (the
    cast is differentiable, so the float32 weight gets a float32 gradient)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return hidden, weight, bias


def shifted_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The next-token target of every position, flattened: `shift_labels` as given, or `labels` shifted left with
    `ignore_index` at the end of each row (transformers' ForCausalLMLoss)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def reduce_like_transformers(total: torch.Tensor, target: torch.Tensor, num_items_in_batch,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' reduction of the summed loss: the mean over kept labels, or the sum divided by
    `num_items_in_batch` (Trainer passes it under gradient accumulation)."""
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def can_chunk(output_layer: nn.Module, bias: bool = False) -> bool:
    """Whether `output_layer` computes exactly `hidden @ weight.T` (`+ bias` where `bias` allows one), which the
    chunk loop reads its parameters for: an `nn.Linear` (FSDP2's and tensor parallelism's wrapping keep its
    forward). A layer with a forward of its own (a LoRA wrapper, a quantized linear) takes the plain path."""
    forward = getattr(type(output_layer), "forward", None)
    return forward is nn.Linear.forward and (bias or getattr(output_layer, "bias", None) is None)


def holds_whole_weight(output_layer: nn.Module, bias: bool = False) -> bool:
    """`can_chunk`, and the weight is a plain tensor on this process (not a tensor-parallel or FSDP2 shard)."""
    return can_chunk(output_layer, bias) and not isinstance(output_layer.weight, DTensor)


def output_logits(output_layer: nn.Module, hidden: torch.Tensor, vocab_size: int, bias: bool = False) -> torch.Tensor:
    """`output_layer(hidden)`, with at least the first `vocab_size` columns: for a hook-free `nn.Linear` (with a
    bias where `bias` allows one: BERT's) that holds its whole weight here (one process, DDP, a gathered FSDP2 unit)
    only the weight's first `vocab_size` rows are multiplied, the rest (Megatron's padding) being logits that the
    loss and the caller slice off anyway. On a CPU the matmuls over the padded 50,304 rows run slower than over
    GPT-2's 50,257, and the slice's backward zero-fills a gradient of the padded logits' size (the cost:
    `scripts/bench/train_step.py`'s padded line). Any other layer (tensor parallel, LoRA, hooked) is called."""
    if (holds_whole_weight(output_layer, bias) and vocab_size < output_layer.weight.shape[0]
            and not output_layer._forward_hooks and not output_layer._forward_pre_hooks):
        rows_bias = None if output_layer.bias is None else output_layer.bias[:vocab_size]
        return nn.functional.linear(hidden, output_layer.weight[:vocab_size], rows_bias)
    return output_layer(hidden)


def check_targets(target: torch.Tensor, classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Refuse a label outside the softmax's classes, as `cross_entropy` does (the loop would score it as an
    impossible class without a word)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if target.device.type != "cpu":  # checked on the device, without waiting for it (as cross_entropy does)
        torch._assert_async(~bad.any(), f"a label is out of range for a loss over {classes} classes")
        return
    if bad.any():
        raise IndexError(f"label {target[bad][0].item()} is out of range for a loss over {classes} classes "
                         f"(ignore_index={ignore_index}).")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk_size: int,
                             start: int = 0, columns: int | None = None, ignore_index: int = IGNORE_INDEX,
                             collectives: Collectives | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross entropy of `hidden [N, H] @ weight[:columns].T (+ bias[:columns])` against `target [N]`,
    chunk by chunk (see `_ChunkedLinearCrossEntropy`)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size={chunk_size!r} must be a positive number of tokens (0 turns it off).")
    hidden, weight, bias = _autocast_inputs(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    columns = weight.shape[0] if columns is None else columns
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are set above; keep them in the loop
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target.to(hidden.device), start, columns,
                                                chunk_size, ignore_index, collectives or Collectives())


def chunked_causal_lm_loss(hidden_states: torch.Tensor, output_layer: nn.Module, labels=None, vocab_size: int = 0,
                           padded_vocab_softmax: bool = False, chunk_size: int = 1024, shift_labels=None,
                           num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, **kwargs) -> torch.Tensor:
    """`causal_lm_loss(output_layer(hidden_states), labels, ...)` without ever holding more than `chunk_size`
    tokens' logits. `output_layer` is the (bias-free) linear output layer, whose weight is read directly."""
    weight = output_layer.weight
    target = shifted_targets(labels, shift_labels, ignore_index)
    columns = weight.shape[0] if padded_vocab_softmax else vocab_size
    check_targets(target, columns, ignore_index)
    total = linear_cross_entropy_sum(hidden_states, weight, target, chunk_size, columns=columns,
                                     ignore_index=ignore_index)
    return reduce_like_transformers(total, target.to(total.device), num_items_in_batch, ignore_index)


def chunked_masked_lm_loss(hidden_states: torch.Tensor, output_layer: nn.Module, labels: torch.Tensor,
                           vocab_size: int = 0, padded_vocab_softmax: bool = False, chunk_size: int = 1024,
                           num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`masked_lm_loss(output_layer(hidden_states), labels, ...)` for the rows of `hidden_states` [N, H] (BERT gives
    it the labeled positions only), with the output layer's bias, never holding more than `chunk_size` rows'
    logits."""
    target = labels.reshape(-1)
    columns = output_layer.weight.shape[0] if padded_vocab_softmax else vocab_size
    check_targets(target, columns, ignore_index)
    total = linear_cross_entropy_sum(hidden_states, output_layer.weight, target, chunk_size, columns=columns,
                                     ignore_index=ignore_index, bias=output_layer.bias)
    return reduce_like_transformers(total, target.to(total.device), num_items_in_batch, ignore_index)


__all__ = ["Collectives", "can_chunk", "check_targets", "chunked_causal_lm_loss", "chunked_masked_lm_loss",
           "linear_cross_entropy_sum", "reduce_like_transformers", "shifted_targets"]
