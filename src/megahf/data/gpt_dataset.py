"""Megatron-Core's GPT dataset: fixed-length samples cut from a shuffled stream of documents.

Given the same `.bin`/`.idx` files, seed and settings, `GPTDataset` yields the same
samples in the same order as `megatron.core.datasets.gpt_dataset.GPTDataset` (megatron-core
0.16.1; `tests/data/test_gpt_dataset.py` compares every token of every sample).

How Megatron-Core builds it (and so megahf)
-------------------------------------------

*Split.* `"969,30,1"` (any separators; missing entries are 0) is normalized to fractions
(float64 division by the sum), accumulated left to right, and each boundary becomes
`int(round(fraction * num_sequences))` -- Python's `round`, half to even. A split of weight 0
is not built at all (`None`); a split of positive weight can still round to no sequence (e.g.
the test split of `"969,30,1"` with 500 sequences or fewer): Megatron-Core then loops forever,
megahf raises `GPTDatasetError` saying which split is empty and how to fix the string.
Splits count *sequences* of the indexed dataset (documents, unless it was written by sentence).

*Epochs.* A sample takes `seq_length + 1` tokens (`add_extra_token_to_sequence`: the
inputs and the labels shifted by one), consecutive samples share one token, so `E` epochs of
`T` tokens give `(E*T - 1) // seq_length` samples; `E` is the smallest number of epochs with
`E*T >= num_samples*seq_length + 1` (one epoch when `num_samples` is None).

*One random stream.* Every dataset (each split of each file) draws from its own
`numpy.random.RandomState(seed)`, all with the same seed, in this order:

1. the document index: the split's sequence ids (int32) repeated `E` times, shuffled. When
   the samples needed from the last epoch are fewer than `int(0.8 * samples per epoch)`, the
   first `E-1` epochs are shuffled together and then the last epoch is shuffled on its own and
   appended (so a short last epoch does not mix with the others);
2. the sample index (no randomness): `megahf.data.sample_index.build_sample_index`, int32
   (int64 for huge datasets);
3. the shuffle index: `arange(num_samples)` shuffled, uint32 (int64 past 2**32-2 samples);
   with the separated last epoch, the samples of the first `E-1` epochs and those of the last
   are shuffled separately and concatenated.

Sample `i` is then `sample_index[shuffle_index[i]]` to `sample_index[shuffle_index[i] + 1]`
read through `document_index`. `len(dataset)` is the number of samples of the `E` epochs,
at least `num_samples`.

*Cache.* With `path_to_cache` set, the three arrays are saved as `.npy` files named by the md5
of a JSON description of everything they depend on (see `GPTDataset.description`) and
reloaded (memory-mapped) next time. Unlike Megatron-Core, the description covers the index's
sequence lengths (an md5 of them, instead of the path) and every setting that changes the
arrays (Megatron-Core's key omits e.g. `add_extra_token_to_sequence`, and reuses the arrays of
a rewritten `.idx` silently); the description is stored next to the arrays and compared on load, the arrays'
shapes are checked, and a mismatch rebuilds (with a warning) instead of reusing; files are
written under temporary names and renamed (atomic), the description last.

What a sample is
----------------

`dataset[i]` is `{"input_ids": LongTensor[seq_length + 1]}`: the model's inputs are
`input_ids[:-1]` and its labels `input_ids[1:]` (Megatron's `tokens` / `labels`), the
collator or the training step does the split. With `add_extra_token_to_sequence=False` it has
`seq_length` tokens and Megatron's last label is padding (masked). `reset_position_ids`,
`reset_attention_mask` and `eod_mask_loss` (which need `eod_token_id`) add Megatron's
`position_ids` (int64), `loss_mask` (float32) and `attention_mask` (bool `[1, s, s]`,
True = masked), all over the `seq_length` input positions, computed as
`_get_ltor_masks_and_position_ids` does. `GPTDataset.get_tokens` gives the raw token
array (numpy int64) in a few microseconds.

Differences from Megatron-Core, on purpose: the errors named above (empty split, a split with
fewer tokens than one sample, `num_samples <= 0`) instead of a hang or a degenerate sample;
`path_to_cache=None` means no cache (Megatron-Core then writes into `{prefix}/cache/`);
tokens equal to the pad id are not rewritten to 0 (Megatron-Core does that whenever its
tokenizer has a pad id distinct from eod); padding (only in the last validation sample with
`drop_last_partial_validation_sequence=False`) is `pad_token_id` in `get_tokens` and 0
with `loss_mask` 0 in `dataset[i]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MegahfError
from .index_cache import description_key, load_or_build
from .sample_index import build_sample_index

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "GPTDataset",
    "GPTDatasetConfig",
    "GPTDatasetError",
    "SPLIT_NAMES",
    "ltor_masks_and_position_ids",
    "parse_split",
    "split_matrix",
    "split_ranges",
]

#: Names of the three splits, in the order of the split string.
SPLIT_NAMES = ("train", "valid", "test")
#: Bumped whenever the cached arrays' meaning changes.
CACHE_FORMAT = 1
#: Megatron-Core separates the last epoch when it supplies fewer samples than this fraction.
LAST_EPOCH_THRESHOLD = 0.80


class GPTDatasetError(MegahfError, ValueError):
    """A GPT dataset that cannot be built as asked; the message says why and what to change."""


# ---------------------------------------------------------------------------------------- split
def _normalize(weights: Sequence[float]) -> List[float]:
    """Megatron-Core's `normalize`: float64 weights divided by their numpy sum."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def parse_split(split: str) -> List[float]:
    """`"969,30,1"` -> `[0.969, 0.03, 0.001]` as Megatron-Core parses it: the numbers in the
    string (any separators), padded with zeros to three, normalized."""
    values = [float(v) for v in re.findall(r"[.0-9]+", str(split))]
    if not values or len(values) > len(SPLIT_NAMES):
        raise GPTDatasetError(
            f"split {split!r}: expected 1 to 3 non-negative weights for train,valid,test, "
            f"e.g. '969,30,1'"
        )
    values += [0.0] * (len(SPLIT_NAMES) - len(values))
    if sum(values) <= 0:
        raise GPTDatasetError(f"split {split!r}: the weights sum to 0; give train a positive weight")
    return _normalize(values)


def split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """The (begin, end) fractions of each split, None for a split of weight 0."""
    bounds = [0]
    for v in parse_split(split):
        bounds.append(bounds[-1] + v)  # left to right in Python floats, as functools.reduce does
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def split_ranges(num_documents: int, split: str) -> List[Optional[range]]:
    """The sequence ids of each split (`[train, valid, test]`), None for a split of weight 0.

    Boundaries are `int(round(fraction * num_documents))` (round half to even), as in
    Megatron-Core; a positive-weight split may come out empty (`range(n, n)`), which
    `GPTDataset` refuses with an explanation.
    """
    n = int(num_documents)
    out: List[Optional[range]] = []
    for bounds in split_matrix(split):
        if bounds is None:
            out.append(None)
        else:
            out.append(range(int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))))
    return out


# --------------------------------------------------------------------------------------- config
@dataclass
class GPTDatasetConfig:
    """Settings of a `GPTDataset` (Megatron-Core's `GPTDatasetConfig` fields, renamed:
    `seq_length` = `sequence_length`, `seed` = `random_seed`)."""

    seq_length: int
    """Tokens per sample fed to the model (a sample holds one more with the extra token)."""
    seed: int = 1234
    """Seed of every dataset's `numpy.random.RandomState` (Megatron-LM's `--seed`)."""
    split: str = "969,30,1"
    """Train, valid, test weights (Megatron-LM's `--split`)."""
    add_extra_token_to_sequence: bool = True
    """Samples of `seq_length + 1` tokens, so inputs and shifted labels both have `seq_length`."""
    reset_position_ids: bool = False
    """Restart the position ids after every end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (adds an `attention_mask`)."""
    eod_mask_loss: bool = False
    """Zero the loss on end-of-document tokens."""
    eod_token_id: Optional[int] = None
    """The end-of-document token id; required by the three options above."""
    pad_token_id: int = -1
    """Fills a padded (last, partial) validation sample in `GPTDataset.get_tokens`."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the last partial sample of the valid split (False keeps it, padded)."""
    path_to_cache: Optional[str] = None
    """Folder for the index arrays (`.npy`); None builds them in memory every time."""
    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples each source of a blend builds (Megatron-Core's default)."""

    def __post_init__(self) -> None:
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, (int, np.integer)):
            raise GPTDatasetError(f"seq_length must be an integer, got {self.seq_length!r}")
        if self.seq_length < 2:
            raise GPTDatasetError(f"seq_length must be at least 2, got {self.seq_length}")
        if int(self.seq_length) > np.iinfo(np.int32).max:
            raise GPTDatasetError(f"seq_length {self.seq_length} does not fit int32")
        parse_split(self.split)  # validates
        if self.mid_level_dataset_surplus < 0:
            raise GPTDatasetError(
                f"mid_level_dataset_surplus must be >= 0, got {self.mid_level_dataset_surplus}"
            )
        needs_eod = self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss
        if needs_eod and self.eod_token_id is None:
            raise GPTDatasetError(
                "reset_position_ids, reset_attention_mask and eod_mask_loss need eod_token_id "
                "(the tokenizer's end-of-document id)"
            )

    @property
    def extra(self) -> int:
        return 1 if self.add_extra_token_to_sequence else 0


# --------------------------------------------------------------------------------------- masks
def ltor_masks_and_position_ids(
    tokens: np.ndarray,
    eod_token_id: Optional[int],
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    create_attention_mask: bool = True,
) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Megatron's `_get_ltor_masks_and_position_ids` for one sample's input tokens, vectorized.

    Returns `(attention_mask bool [1, s, s] with True = masked (or None), loss_mask float32 [s],
    position_ids int64 [s])`.
    """
    s = int(tokens.shape[0])
    eod = tokens == eod_token_id if eod_token_id is not None else np.zeros(s, dtype=bool)
    loss_mask = np.ones(s, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[eod] = 0.0
    # segment of each position: number of eod tokens strictly before it
    segment = np.concatenate(([0], np.cumsum(eod[:-1], dtype=np.int64))) if s else np.zeros(0, np.int64)
    position_ids = np.arange(s, dtype=np.int64)
    if reset_position_ids:
        seg_start = np.concatenate(([0], np.flatnonzero(eod) + 1))
        position_ids -= seg_start[segment]
    attention_mask = None
    if create_attention_mask:
        allowed = np.tri(s, dtype=bool)
        if reset_attention_mask:
            allowed &= segment[:, None] == segment[None, :]
        attention_mask = ~allowed[None]
    return attention_mask, loss_mask, position_ids


# ------------------------------------------------------------------------------------ dataset
_LENGTHS_MD5: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _lengths_md5(indexed: Any, lengths: np.ndarray) -> str:
    """md5 of an indexed dataset's sequence lengths, computed once per reader object."""
    try:
        return _LENGTHS_MD5[indexed]
    except (KeyError, TypeError):
        pass
    digest = hashlib.md5(np.ascontiguousarray(lengths).view(np.uint8)).hexdigest()
    try:
        _LENGTHS_MD5[indexed] = digest
    except TypeError:  # not weak-referenceable
        pass
    return digest


def _token_view(indexed: Any) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """All tokens of `indexed` as one array and each sequence's first token in it, when the
    reader gives access to them (megahf's and Megatron-Core's readers do); else (None, None)
    and samples are read through `indexed.get`."""
    try:
        tokens = getattr(indexed, "tokens", None)  # megahf.data.IndexedDataset: one flat token array
        if not isinstance(tokens, np.ndarray):
            tokens = None
        pointers = getattr(indexed, "sequence_pointers", None)
        dtype = getattr(indexed, "dtype", None)
        if tokens is None:
            index = getattr(indexed, "index", None)  # megatron.core IndexedDataset
            prefix = getattr(indexed, "path_prefix", None)
            if index is None or prefix is None or not os.path.isfile(prefix + ".bin"):
                return None, None
            pointers = index.sequence_pointers
            dtype = np.dtype(index.dtype)
            if os.path.getsize(prefix + ".bin") == 0:
                return None, None
            tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        if pointers is None or dtype is None:
            return None, None
        starts = np.asarray(pointers, dtype=np.int64) // np.dtype(dtype).itemsize
        return tokens, starts
    except Exception:  # any reader we do not know: fall back to get()
        return None, None


class GPTDataset:
    """Megatron-Core's GPTDataset over one split of an indexed dataset.

    Args:
        indexed: the token source; needs `sequence_lengths` (int32 array) and
            `get(idx, offset, length)`; megahf's `megahf.data.IndexedDataset` (and
            Megatron-Core's) are read directly through their memory map.
        split_documents: the sequence ids of the split, a `range` (see `split_ranges`)
            or an array.
        num_samples: samples wanted (the dataset has at least this many: whole epochs' worth);
            None for exactly one epoch.
        config: `GPTDatasetConfig`.
        split_name: `"train"`, `"valid"` or `"test"` (`"valid"` honours
            `drop_last_partial_validation_sequence`; all are part of the cache key).
    """

    def __init__(
        self,
        indexed: Any,
        split_documents: Union[range, Sequence[int], np.ndarray],
        num_samples: Optional[int],
        config: GPTDatasetConfig,
        split_name: str = "train",
    ) -> None:
        if split_name not in SPLIT_NAMES:
            raise GPTDatasetError(f"split_name must be one of {SPLIT_NAMES}, got {split_name!r}")
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
                raise GPTDatasetError(f"num_samples must be an integer or None, got {num_samples!r}")
            if num_samples <= 0:
                raise GPTDatasetError(
                    f"{split_name} split: num_samples must be positive, got {num_samples} "
                    f"(pass None for one epoch, or do not build this split)"
                )
            num_samples = int(num_samples)
        self.indexed = indexed
        self.config = config
        self.split_name = split_name
        self.num_samples = num_samples
        sizes = np.asarray(indexed.sequence_lengths)
        self.sequence_lengths = sizes
        num_sequences = int(sizes.shape[0])
        if isinstance(split_documents, range):
            if split_documents.step != 1:
                raise GPTDatasetError("split_documents must be a contiguous range (step 1)")
            self.indices = np.arange(split_documents.start, split_documents.stop, dtype=np.int32)
        else:
            self.indices = np.asarray(split_documents).astype(np.int32, copy=False).reshape(-1)
        self.prefix = getattr(indexed, "path_prefix", None)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= num_sequences):
            raise GPTDatasetError(
                f"{split_name} split: sequence ids {int(self.indices.min())}..{int(self.indices.max())} "
                f"outside the dataset's {num_sequences} sequences"
            )
        where = f" of {self.prefix!r}" if self.prefix else ""
        if self.indices.size == 0:
            raise GPTDatasetError(
                f"the {split_name} split{where} is empty: split {config.split!r} over its "
                f"{num_sequences} sequences (documents) gives the {split_name} split "
                f"{_describe_range(split_documents)}. Megatron-Core would loop forever here. Give "
                f"{split_name} a larger weight in the split string (at {num_sequences} sequences "
                f"each sequence is {100.0 / max(num_sequences, 1):.3g}% of the data), use a larger "
                f"corpus, or set its weight to 0 ({_without_split(config.split, split_name)!r}) to not "
                f"build it"
            )
        self.tokens_per_epoch = int(np.sum(sizes[self.indices], dtype=np.int64))
        extra = config.extra
        seq = int(config.seq_length)
        if self.tokens_per_epoch < seq + extra:
            raise GPTDatasetError(
                f"the {split_name} split{where} has {self.tokens_per_epoch} tokens in "
                f"{self.indices.size} sequences, fewer than one sample of seq_length "
                f"{seq}{' + 1' if extra else ''} tokens; lower seq_length, give the split more "
                f"weight, or use a larger corpus"
            )
        self.num_epochs = self._num_epochs()
        self.separate_last_epoch, self.samples_before_last_epoch = self._last_epoch_rule()
        self.drop_last_partial_sequence = (
            config.drop_last_partial_validation_sequence if split_name == "valid" else True
        )
        self._description: Optional[str] = None  # computed when a cache needs it
        self.cache_paths: Optional[Dict[str, str]] = None
        self.loaded_from_cache = False
        self.document_index, self.sample_index, self.shuffle_index = self._build_or_load()
        self._length = int(self.sample_index.shape[0]) - 1
        self._setup_reader()

    # ----------------------------------------------------------------------- construction
    def _num_epochs(self) -> int:
        if self.num_samples is None:
            return 1
        requested = self.num_samples * self.config.seq_length + self.config.extra
        return max(1, -(-requested // self.tokens_per_epoch))

    def _last_epoch_rule(self) -> Tuple[bool, int]:
        """Whether the last epoch is shuffled on its own (it supplies fewer than
        `int(0.8 * samples per epoch)` of the samples wanted), and the samples before it."""
        if self.num_epochs == 1:
            return False, 0
        seq, extra, tpe = int(self.config.seq_length), self.config.extra, self.tokens_per_epoch
        before = ((self.num_epochs - 1) * tpe - extra) // seq
        from_last = self.num_samples - before
        per_epoch = (tpe - extra) // seq
        assert 0 <= from_last <= per_epoch + 1
        return from_last < int(LAST_EPOCH_THRESHOLD * per_epoch), before

    def _describe(self) -> str:
        lengths_md5 = _lengths_md5(self.indexed, self.sequence_lengths)
        indices = self.indices
        contiguous = bool(indices.size == 0 or np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size)))
        desc = {
            "class": "megahf.data.GPTDataset",
            "format": CACHE_FORMAT,
            "num_sequences": int(self.sequence_lengths.shape[0]),
            "sequence_lengths_md5": lengths_md5,
            "split_documents": (
                [int(indices[0]), int(indices[0]) + int(indices.size)]
                if contiguous
                else hashlib.md5(indices.view(np.uint8)).hexdigest()
            ),
            "split_name": self.split_name,
            "num_samples": self.num_samples,
            "seq_length": int(self.config.seq_length),
            "seed": int(self.config.seed),
            "add_extra_token_to_sequence": bool(self.config.add_extra_token_to_sequence),
            "drop_last_partial_sequence": bool(self.drop_last_partial_sequence),
        }
        return json.dumps(desc, indent=4)

    @property
    def description_json(self) -> str:
        """What the index arrays depend on, as JSON: the sequence lengths of the whole indexed
        dataset (their md5: the data's path and token values do not matter, so a copied corpus
        reuses the cache and a rewritten one does not), the split's sequences, its name, the
        samples asked, and the settings that change the arrays."""
        if self._description is None:
            self._description = self._describe()
        return self._description

    def description(self) -> Dict[str, Any]:
        """`description_json` as a dict."""
        return json.loads(self.description_json)

    @property
    def cache_key(self) -> str:
        """md5 of `description_json`; names the cache files."""
        return description_key(self.description_json)

    def _expected_lengths(self) -> Tuple[int, int]:
        tokens = self.num_epochs * self.tokens_per_epoch
        seq, extra = int(self.config.seq_length), self.config.extra
        if self.drop_last_partial_sequence:
            n = (tokens - extra) // seq
        else:
            n = int(np.ceil(np.float32(tokens - extra) / np.float32(seq)))
        return self.num_epochs * int(self.indices.size), n

    def _build_or_load(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays, self.cache_paths, self.loaded_from_cache = load_or_build(
            self.config.path_to_cache,
            f"GPTDataset-{self.split_name}",
            self.description_json if self.config.path_to_cache else "",
            ("document_index", "sample_index", "shuffle_index"),
            self._build,
            self._valid_cache,
        )
        return arrays

    def _valid_cache(self, doc: np.ndarray, sample: np.ndarray, shuffle: np.ndarray) -> bool:
        n_doc, n = self._expected_lengths()
        return (
            doc.shape == (n_doc,)
            and doc.dtype == np.int32
            and sample.shape == (n + 1, 2)
            and sample.dtype in (np.int32, np.int64)
            and shuffle.shape == (n,)
            and shuffle.dtype in (np.uint32, np.int64)
        )

    def _build(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        seq = int(self.config.seq_length)
        epochs, tpe = self.num_epochs, self.tokens_per_epoch
        separate_last, samples_before_last = self.separate_last_epoch, self.samples_before_last_epoch
        rng = np.random.RandomState(self.config.seed)
        if separate_last:
            first = np.tile(self.indices, epochs - 1)
            rng.shuffle(first)
            last = self.indices.copy()
            rng.shuffle(last)
            document_index = np.concatenate((first, last))
        else:
            document_index = np.tile(self.indices, epochs)
            rng.shuffle(document_index)
        sample_index = build_sample_index(
            self.sequence_lengths,
            document_index,
            seq,
            epochs,
            tpe,
            self.drop_last_partial_sequence,
            self.config.add_extra_token_to_sequence,
        )
        total = sample_index.shape[0] - 1
        dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
        if separate_last:
            head = np.arange(samples_before_last, dtype=dtype)
            rng.shuffle(head)
            tail = np.arange(samples_before_last, total, dtype=dtype)
            rng.shuffle(tail)
            shuffle_index = np.concatenate((head, tail))
        else:
            shuffle_index = np.arange(total, dtype=dtype)
            rng.shuffle(shuffle_index)
        return document_index, sample_index, shuffle_index

    # ----------------------------------------------------------------------- reading
    def _setup_reader(self) -> None:
        self._tokens, self._starts = _token_view(self.indexed)
        self._extra = self.config.extra
        self._sample_length = int(self.config.seq_length) + self._extra
        flags = self.config
        self._with_masks = bool(
            flags.reset_position_ids
            or flags.reset_attention_mask
            or flags.eod_mask_loss
            or not flags.add_extra_token_to_sequence
            or not self.drop_last_partial_sequence
        )

    def __len__(self) -> int:
        return self._length

    def _locate(self, idx: int) -> Tuple[int, int, int, int]:
        """(first, last) positions in the document index and (start, stop) token offsets in the
        first and last of those sequences, of sample `idx`."""
        n = self._length
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sample {idx} out of range for the {self.split_name} split ({n} samples)")
        j = self.shuffle_index.item(idx)
        k0, o0, k1, o1 = self.sample_index[j : j + 2].ravel().tolist()
        return k0, k1, o0, o1 + self._extra

    def _read(self, idx: int) -> Tuple[np.ndarray, int]:
        """Sample `idx`'s tokens (int64, padded with `pad_token_id`) and how many are real."""
        k0, k1, start, stop = self._locate(int(idx))
        doc_index, tokens, size = self.document_index, self._tokens, self._sample_length
        if tokens is not None:  # straight from the memory map
            starts, lengths = self._starts, self.sequence_lengths
            if k0 == k1:
                s = starts.item(doc_index.item(k0))
                out = tokens[s + start : s + stop].astype(np.int64)
                got = out.shape[0]
                if got == size:
                    return out, size
                return np.concatenate((out, np.full(size - got, self.config.pad_token_id, np.int64))), got
            out = np.empty(size, dtype=np.int64)
            pos = 0
            for k in range(k0, k1 + 1):
                d = doc_index.item(k)
                s = starts.item(d)
                lo = start if k == k0 else 0
                hi = stop if k == k1 else lengths.item(d)
                nxt = pos + hi - lo
                out[pos:nxt] = tokens[s + lo : s + hi]
                pos = nxt
        else:  # through the reader's get()
            parts = []
            for k in range(k0, k1 + 1):
                d = doc_index.item(k)
                lo = start if k == k0 else 0
                parts.append(self.indexed.get(d, offset=lo, length=(stop - lo) if k == k1 else None))
            out = np.concatenate(parts, dtype=np.int64)
            pos = out.shape[0]
            if pos < size:
                out = np.concatenate((out, np.empty(size - pos, np.int64)))
        if pos < size:
            out[pos:] = self.config.pad_token_id
        return out, pos

    def get_tokens(self, idx: int) -> np.ndarray:
        """Sample `idx`'s tokens (int64, `seq_length + 1` with the extra token), as Megatron's
        `_query_document_sample_shuffle_indices` returns them (padding = `pad_token_id`)."""
        return self._read(idx)[0]

    def document_ids(self, idx: int) -> List[int]:
        """The sequence ids sample `idx` reads from, in order."""
        k0, k1, _, _ = self._locate(int(idx))
        return np.asarray(self.document_index[k0 : k1 + 1]).tolist()

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        import torch  # here, not at the top: megahf.data stays numpy-only for the CLI and the data tools

        text, valid = self._read(idx)
        out: Dict[str, Any] = {}
        cfg = self.config
        if self._with_masks:
            inputs = text[:-1] if cfg.add_extra_token_to_sequence else text
            attention_mask, loss_mask, position_ids = ltor_masks_and_position_ids(
                inputs,
                cfg.eod_token_id,
                cfg.reset_position_ids,
                cfg.reset_attention_mask,
                cfg.eod_mask_loss,
                create_attention_mask=cfg.reset_attention_mask,
            )
            if valid < text.shape[0]:
                # labels are text[1:] (or text[1:] + one pad without the extra token)
                loss_mask[max(valid - 1, 0) :] = 0.0
                text[valid:] = 0
            elif not cfg.add_extra_token_to_sequence:
                loss_mask[-1] = 0.0  # Megatron's last label is padding
            out["loss_mask"] = torch.from_numpy(loss_mask)
            out["position_ids"] = torch.from_numpy(position_ids)
            if attention_mask is not None:
                out["attention_mask"] = torch.from_numpy(attention_mask)
        out["input_ids"] = torch.from_numpy(text)
        return out

    # ----------------------------------------------------------------------- pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = state["_starts"] = None
        state["sequence_lengths"] = None  # a view of the reader's map: taken again from it
        if self.loaded_from_cache and self.cache_paths:
            for name in ("document_index", "sample_index", "shuffle_index"):
                state[name] = None  # reopened from the cache files
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sequence_lengths = np.asarray(self.indexed.sequence_lengths)
        if self.document_index is None:
            p = self.cache_paths
            self.document_index = np.load(p["document_index"], mmap_mode="r")
            self.sample_index = np.load(p["sample_index"], mmap_mode="r")
            self.shuffle_index = np.load(p["shuffle_index"], mmap_mode="r")
        self._setup_reader()

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.split_name}, sequences={self.indices.size}, samples={len(self)}, "
            f"epochs={self.num_epochs}, seq_length={self.config.seq_length})"
        )


def _without_split(split: str, split_name: str) -> str:
    """`split` with the weight of `split_name` set to 0 (for error messages)."""
    values = re.findall(r"[.0-9]+", str(split))
    values += ["0"] * (len(SPLIT_NAMES) - len(values))
    values[SPLIT_NAMES.index(split_name)] = "0"
    return ",".join(values)


def _describe_range(docs: Any) -> str:
    if isinstance(docs, range):
        return f"sequences {docs.start}..{docs.stop} (none)"
    return "no sequences"
