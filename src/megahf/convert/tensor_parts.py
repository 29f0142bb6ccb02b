"""Tensors made of other tensors' parts, still unread: a transpose, a range of rows, rows padded with zeros, row
ranges stacked. Each is a `TensorRef` whose `read(block)` reads only the sources' parts the block needs, so that a
converted checkpoint (GPT-2's transposed Conv1D and [q; k; v] matrix, Llama's separate q, k and v, both padded to
Megatron's vocabulary) loads shard by shard into a tensor-parallel / FSDP2 model: each rank reads what it keeps.

`load()` (the whole tensor, what `megahf convert` writes) stays the direct computation on whole tensors; the tests
check that every block read equals the same block of `load()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import Block, ConversionError, TensorRef


def whole(shape: Sequence[int]) -> Block:
    """The block that is the whole tensor."""
    return tuple(slice(0, n) for n in shape)


def _bounds(s: slice, size: int) -> tuple[int, int]:
    start, stop, _ = s.indices(size)
    return start, max(start, stop)


def transposed(ref: TensorRef) -> TensorRef:
    """The transpose of a 2-D tensor (GPT-2's Conv1D [in, out] as nn.Linear's [out, in])."""
    rows, cols = ref.shape
    return TensorRef((cols, rows), ref.dtype, lambda: ref.load().t().contiguous(),
                     lambda block: ref.read((block[1], block[0])).t().contiguous())


def row_range(ref: TensorRef, start: int, stop: int) -> TensorRef:
    """Rows [start, stop) of a tensor."""
    rest = whole(ref.shape[1:])

    def load_block(block: Block) -> torch.Tensor:
        first, last = _bounds(block[0], stop - start)
        return ref.read((slice(start + first, start + last), *block[1:]))

    return TensorRef((stop - start, *ref.shape[1:]), ref.dtype, lambda: ref.read((slice(start, stop), *rest)),
                     load_block)


def padded_rows(ref: TensorRef, rows: int, load: Callable[[], torch.Tensor] | None = None) -> TensorRef:
    """The tensor with zero rows appended up to `rows` (Megatron's padded vocabulary). `load`: how the whole padded
    tensor is computed, if the caller has its own way."""
    have = ref.shape[0]
    if have > rows:
        raise ConversionError(f"{have} vocabulary rows do not fit in {rows}: give a vocab_size of at least {have}")

    def load_whole() -> torch.Tensor:
        tensor = ref.load()
        return torch.cat([tensor, tensor.new_zeros(rows - have, *tensor.shape[1:])]) if rows > have else tensor

    def load_block(block: Block) -> torch.Tensor:
        first, last = _bounds(block[0], rows)
        real = ref.read((slice(min(first, have), min(last, have)), *block[1:]))
        pad = (last - first) - real.shape[0]
        return torch.cat([real, real.new_zeros(pad, *real.shape[1:])]) if pad else real

    return TensorRef((rows, *ref.shape[1:]), ref.dtype, load or load_whole, load_block)


def stacked_rows(parts: Sequence[TensorRef], load: Callable[[], torch.Tensor] | None = None) -> TensorRef:
    """The parts' rows one after another (the parts agree on every other dimension). `load`: how the whole tensor is
    computed, if the caller has its own way."""
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + part.shape[0])

    def load_block(block: Block) -> torch.Tensor:
        first, last = _bounds(block[0], starts[-1])
        pieces = [part.read((slice(max(first, lo) - lo, min(last, hi) - lo), *block[1:]))
                  for part, lo, hi in zip(parts, starts, starts[1:]) if max(first, lo) < min(last, hi)]
        if not pieces:  # an empty block
            return parts[0].read((slice(0, 0), *block[1:]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    return TensorRef((starts[-1], *parts[0].shape[1:]), parts[0].dtype,
                     load or (lambda: torch.cat([part.load() for part in parts])), load_block)


def grouped_qkv(q: TensorRef, k: TensorRef, v: TensorRef, groups: int,
                load: Callable[[], torch.Tensor] | None = None) -> TensorRef:
    """Megatron-Core's fused QKV rows (for each query group: its queries, its key, its value) of separate q
    [heads x d, ...], k and v [groups x d, ...]. A tensor-parallel rank keeps whole groups, so its block reads only
    its groups' rows of q, k and v."""
    d = k.shape[0] // groups
    per_group = q.shape[0] // groups
    parts = []
    for g in range(groups):
        parts += [row_range(q, g * per_group, (g + 1) * per_group), row_range(k, g * d, (g + 1) * d),
                  row_range(v, g * d, (g + 1) * d)]
    return stacked_rows(parts, load)


__all__ = ["grouped_qkv", "padded_rows", "row_range", "stacked_rows", "transposed", "whole"]
