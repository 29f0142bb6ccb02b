"""Megatron-Core's two index builders (`helpers.cpp`), in vectorized numpy.

Megatron-Core compiles `megatron/core/datasets/helpers.cpp` (pybind11) for two loops that
are sequential as written:

* `build_sample_index` -- `build_sample_idx`: where each GPT sample starts, as
  (position in the document index, token offset in that document) pairs;
* `build_blending_indices` -- `build_blending_indices`: which dataset (and which of its
  samples) each sample of a blend comes from, greedily following the weights.

Both functions here return arrays equal element for element (values, shape and dtype) to
megatron-core 0.16.1's compiled helpers (`tests/data/test_gpt_dataset.py` checks it on random
inputs), without a C++ compile step or numba.

How the sequential loops become array operations
------------------------------------------------

*Sample index.* Lay the documents of the document index end to end. Sample `i` (`i >= 1`)
starts at token `i * seq_length` of that stream; the C++ walk stops in the first document
whose end reaches `i * seq_length + extra` (`extra` = 1 with the extra label token), and
records the offset `i * seq_length - start of that document`. So the document of boundary
`i` is a count: the number of documents `k` with `(end[k] - extra) // seq_length < i`,
which a prefix sum of a `np.bincount` gives for all boundaries at once, in
O(documents + samples) (no search, no Python loop). When the last sample is kept although partial
(`drop_last_partial_sequence=False`), boundaries past the end point at the last document with
offset `length - extra`, as the C++ loop records them.

*Blending index.* Step `s` picks the dataset `d` with the largest
`weights[d] * max(s, 1) - count[d]` (the first one on ties). The loop depends on its own past
through `count`, so the steps are cut into blocks simulated side by side (one numpy operation
per step advances every block): each block starts from a guess of the counts at its first step;
a block whose guess differs from the counts its predecessor actually ended with is simulated
again from those, until every block starts where its predecessor ends. The result is then
exactly the sequential one (by induction over the blocks), and the same float64 operations as
the C++ (one product, one subtraction, first maximum) give the same picks bit for bit. Wrong
guesses cost little because the greedy corrects itself: a block started from slightly wrong
counts falls onto the true sequence after a few steps, so its end is right and nothing
propagates (a fallback handles any that does not, at the cost of more rounds).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "build_blending_indices",
    "build_exhaustive_blending_indices",
    "build_sample_index",
    "sample_index_dtype",
]

_INT32_MAX = int(np.iinfo(np.int32).max)


def sample_index_dtype(sizes: np.ndarray, document_index: np.ndarray) -> np.dtype:
    """The dtype Megatron-Core gives the sample index: int32 when both the document index length
    and the longest sequence of the *whole* dataset fit in int32, else int64."""
    longest = int(sizes.max()) if sizes.size else 0
    return np.dtype(np.int32) if max(int(document_index.shape[0]), longest) <= _INT32_MAX else np.dtype(np.int64)


def _num_samples(num_tokens: int, seq_length: int, extra: int, drop_last_partial_sequence: bool) -> int:
    if drop_last_partial_sequence:
        return (num_tokens - extra) // seq_length
    # helpers.cpp computes ceil(float(tokens - extra) / seq_length) in single precision
    return int(np.ceil(np.float32(num_tokens - extra) / np.float32(seq_length)))


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    """Megatron's GPT sample index, shape `(num_samples + 1, 2)`.

    Same arguments and result as `megatron.core.datasets.helpers.build_sample_idx`: `sizes`
    are the sequence lengths of the whole indexed dataset, `document_index` the (shuffled,
    epoch-repeated) sequence ids; row `i` is `(position in document_index, token offset)`
    where sample `i` starts, the last row where the last sample ends. The number of samples
    is `(num_epochs * tokens_per_epoch - extra) // seq_length` (rounded up, in float32 as the
    C++ does, when `drop_last_partial_sequence` is False), `extra` being 1 when
    `add_extra_token_to_sequence`.
    """
    sizes = np.asarray(sizes)
    document_index = np.asarray(document_index)
    seq_length = int(seq_length)
    extra = 1 if add_extra_token_to_sequence else 0
    if seq_length <= 1:
        raise ValueError(f"seq_length must be > 1, got {seq_length}")
    if document_index.ndim != 1 or document_index.shape[0] == 0:
        raise ValueError("document_index must be a non-empty 1-D array")
    num_tokens = int(num_epochs) * int(tokens_per_epoch)
    n = _num_samples(num_tokens, seq_length, extra, drop_last_partial_sequence)
    if n < 0:
        raise ValueError(f"{num_tokens} tokens cannot make a sample of {seq_length + extra} tokens")
    dtype = sample_index_dtype(sizes, document_index)

    lengths = sizes.take(document_index)
    # int32 arithmetic when the stream is short enough (half the memory traffic)
    stream = int(lengths.sum(dtype=np.int64))
    acc = np.int32 if max(stream, num_tokens) + 2 * seq_length < _INT32_MAX else np.int64
    ends = np.cumsum(lengths, dtype=acc)  # exclusive end of each document in the token stream
    # boundary i (1..n) lies at token i * seq_length and belongs to the first document whose end
    # reaches i * seq_length + extra, i.e. whose cnt = (end - extra) // seq_length is >= i
    cnt = ends - acc(extra)
    np.floor_divide(cnt, acc(seq_length), out=cnt)
    np.clip(cnt, 0, n, out=cnt)
    reachable = int(cnt[-1])  # boundaries whose sample ends inside the stream
    # documents with cnt < i, for each i: a prefix sum of how many documents have each cnt
    doc = np.cumsum(np.bincount(cnt, minlength=n + 1)[:reachable], dtype=np.int64)

    out = np.empty((n + 1, 2), dtype=dtype)
    out[0] = 0
    out[1 : reachable + 1, 0] = doc
    # offset = i * seq_length - start of the document = i * seq - end + length
    off = np.arange(seq_length, (reachable + 1) * seq_length, seq_length, dtype=np.int64)
    off -= ends.take(doc)
    off += lengths.take(doc)
    out[1 : reachable + 1, 1] = off
    if reachable < n:
        # the walk ran off the last document: the C++ records (last, its length - extra)
        out[reachable + 1 :, 0] = document_index.shape[0] - 1
        out[reachable + 1 :, 1] = int(sizes[document_index[-1]]) - extra
    return out


def _simulate(
    weights: np.ndarray,
    counts: np.ndarray,
    first_steps: np.ndarray,
    num_steps: int,
    dataset_index: Optional[np.ndarray] = None,
    sample_index: Optional[np.ndarray] = None,
    caps: Optional[np.ndarray] = None,
) -> None:
    """Advance `len(first_steps)` blocks of the greedy by `num_steps` steps, side by side.

    `counts` (float64, blocks x datasets, C-contiguous) holds each block's counts at its first
    step and is updated in place to the counts after its last step. When given, step `j`'s
    picks go to `dataset_index[j]` and the picked dataset's count before the pick to
    `sample_index[j]` (both steps x blocks). With `caps` (float64 per dataset), a dataset
    whose count reached its cap is no longer picked (the exhaustive blend).
    """
    nb, nd = counts.shape
    flat_counts = counts.reshape(-1)
    row_base = np.arange(nb, dtype=np.intp) * nd
    base = first_steps.astype(np.float64)
    step = np.empty(nb, dtype=np.float64)
    err = np.empty((nb, nd), dtype=np.float64)
    pick = np.empty(nb, dtype=np.intp)
    flat = np.empty(nb, dtype=np.intp)
    before = np.empty(nb, dtype=np.float64)
    w = weights[None, :]
    for j in range(num_steps):
        np.add(base, j, out=step)
        np.maximum(step, 1.0, out=step)  # helpers.cpp: max(double(s), 1.0)
        np.multiply(w, step[:, None], out=err)
        np.subtract(err, counts, out=err)
        if caps is not None:
            np.putmask(err, counts >= caps, -np.inf)
        np.argmax(err, axis=1, out=pick)  # first maximum, as the C++ strict '>'
        np.add(row_base, pick, out=flat)
        np.take(flat_counts, flat, out=before)
        if dataset_index is not None:
            dataset_index[j] = pick
            sample_index[j] = before
        before += 1.0
        flat_counts[flat] = before


def _guess_counts(weights: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Counts close to the greedy's at each step of `steps`: floor of the ideal, the remainder
    given to the largest fractional parts (so that they sum to the step)."""
    ideal = weights[None, :] * steps[:, None].astype(np.float64)
    counts = np.floor(ideal)
    short = steps - counts.sum(axis=1).astype(np.int64)
    frac = ideal - counts
    order = np.argsort(-frac, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(weights.shape[0])[None, :], axis=1)
    counts += rank < short[:, None]
    return counts


def build_blending_indices(
    weights: Sequence[float], size: int, block: int = 0, warmup: int = -1
) -> Tuple[np.ndarray, np.ndarray]:
    """Megatron's blending indices: `(dataset_index int16, dataset_sample_index int64)`.

    The same arrays as `helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index,
    weights, len(weights), size, False)` fills: sample `s` of the blend is sample
    `dataset_sample_index[s]` of dataset `dataset_index[s]`, chosen greedily as the dataset
    with the largest `weights[d] * max(s, 1) - (samples taken so far from d)` (the first on
    ties). Pass the weights already normalized, as Megatron's BlendedDataset does.
    `block` (steps per block) and `warmup` (steps each block's guess is run before its first
    step) only affect speed; 0 / -1 choose them.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    return _blend(w, int(size), None, block, warmup)


def build_exhaustive_blending_indices(
    sizes: Sequence[int], block: int = 0, warmup: int = -1
) -> Tuple[np.ndarray, np.ndarray]:
    """Megatron's `build_exhaustive_blending_indices`: exactly `sizes[d]` samples from each
    dataset `d` (`sum(sizes)` in all), picked by the same greedy with weights
    `sizes / sum(sizes)`, a dataset leaving the race once all its samples are taken."""
    caps = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if caps.size and caps.min() <= 0:
        raise ValueError(f"every size must be positive, got {caps.tolist()}")
    total = int(caps.sum())
    w = caps.astype(np.float64) / float(total) if total else caps.astype(np.float64)
    return _blend(w, total, caps.astype(np.float64), block, warmup)


def _blend(
    w: np.ndarray, size: int, caps: Optional[np.ndarray], block: int, warmup: int
) -> Tuple[np.ndarray, np.ndarray]:
    num = int(w.shape[0])
    if num == 0:
        raise ValueError("at least one weight is needed")
    if num >= 32767:
        raise ValueError(f"at most 32766 datasets can be blended (int16 dataset index), got {num}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    if size == 0:
        return dataset_index, dataset_sample_index
    if block <= 0:
        block = int(min(size, max(256, math.isqrt(size) // 2)))
    block = min(block, size)
    nblocks = -(-size // block)
    first = np.arange(nblocks, dtype=np.int64) * block
    # guess each block's starting counts: from rough counts a few steps earlier, let the greedy
    # settle on its own track (it corrects small errors within a few steps)
    warm = np.minimum(first, min(block, warmup if warmup >= 0 else 64))
    start = _guess_counts(w, first - warm)
    if caps is not None:
        np.minimum(start, caps[None, :], out=start)
    start[0] = 0.0
    if warm.max() > 0:
        # only block 0 (exact from zero counts) has no room to warm up
        wmax = int(warm.max())
        sel = np.flatnonzero(warm == wmax)
        counts = np.ascontiguousarray(start[sel])
        _simulate(w, counts, first[sel] - wmax, wmax, caps=caps)
        start[sel] = counts
    di = np.empty((block, nblocks), dtype=np.int16)
    si = np.empty((block, nblocks), dtype=np.float64)
    end = start.copy()
    _simulate(w, end, first, block, di, si, caps)
    # make every block start where its predecessor ended; redo those that did not
    todo = np.flatnonzero((start[1:] != end[:-1]).any(axis=1)) + 1
    while todo.size:
        start[todo] = end[todo - 1]
        counts = np.ascontiguousarray(start[todo])
        sub_di = np.empty((block, todo.size), dtype=np.int16)
        sub_si = np.empty((block, todo.size), dtype=np.float64)
        _simulate(w, counts, first[todo], block, sub_di, sub_si, caps)
        changed = (counts != end[todo]).any(axis=1)
        di[:, todo] = sub_di
        si[:, todo] = sub_si
        end[todo] = counts
        # a block whose end moved invalidates its successor's start
        nxt = todo[changed] + 1
        nxt = np.unique(nxt[nxt < nblocks])
        todo = nxt[(start[nxt] != end[nxt - 1]).any(axis=1)] if nxt.size else nxt
    dataset_index[:] = di.T.reshape(-1)[:size]
    dataset_sample_index[:] = si.T.reshape(-1)[:size]
    return dataset_index, dataset_sample_index
