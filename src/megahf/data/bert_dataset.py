"""Megatron's BERT pretraining samples: masked LM plus sentence-order prediction over
sentence-split data.

Given the same `.bin`/`.idx` files (written with `--split-sentences`: one sequence per
sentence, a document is its sentences), seed and settings, `BertDataset` yields the same
samples as `megatron.core.datasets.bert_dataset.BERTMaskedWordPieceDataset` (megatron-core
0.16.1, with Megatron-LM's `pretrain_bert.py` settings: 3-gram masking, no permutation, no
geometric spans): the same sentences in the same order, the same segments A and B, the same
truncation and the same masked positions and replacement tokens (`tests/data/test_bert_dataset.py`
compares them sample by sample). Only the output format differs (see *What a sample is*).

How Megatron-Core builds it (and so megahf)
-------------------------------------------

*Split.* Unlike the GPT dataset, the split string divides *documents* (`split_ranges` over
`indexed.num_documents`), and a sample never crosses a document.

*Sample mapping* (Megatron's `helpers.build_mapping`). The target length of a sample is
`max_seq_length = seq_length - 3` (room for `[CLS]` and two `[SEP]`). A 32-bit Mersenne
Twister (`std::mt19937(seed)`) draws the target of each sample: with `ratio =
round(1 / short_sequence_probability)` a draw `r` with `r % ratio == 0` asks a short sample of
`2 + r % (max_seq_length - 1)` tokens, any other draw the full `max_seq_length`. Documents with
fewer than `min_sentences` sentences (2 with sentence-order prediction, else 1) or with a
sentence longer than 512 tokens are skipped and draw nothing. In each other document, sentences
are gathered greedily: a sample closes after the sentence that brings it to its target (if it
has `min_sentences` and more than one sentence of the document is left) or at the document's
end; the next draw then gives the next sample's target. Passes over all documents (epochs,
the generator running on) repeat until at least `num_samples` samples exist (one pass when
`num_samples` is None); the `(first sentence, end sentence, target)` rows are then shuffled by
Fisher-Yates with a 64-bit Mersenne Twister (`std::mt19937_64(seed + 1)`). Both generators are
reproduced here in numpy (`MT19937`, `MT19937_64`). `len(dataset)` is the number
of rows (whole passes: at least `num_samples`).

*A sample* (`BERTMaskedWordPieceDataset.__getitem__`), all draws from
`numpy.random.RandomState((seed + index) % 2**32)`, so a sample depends only on (seed, index):

1. with sentence-order prediction, segment A is the first `pivot` sentences and B the rest,
   `pivot` = 1 for two sentences, else `randint(1, n)`; then `random() < 0.5` swaps A and B
   (`next_sentence_label` = 1, "random");
2. while A + B is longer than the target, one token is dropped from the longer segment (B on a
   tie), from its front when `random() < 0.5`, else from its back;
3. `[CLS] A [SEP] B [SEP]` (without B: `[CLS] A [SEP]`), token types 0 up to the first
   `[SEP]`, 1 after;
4. masked LM: `min(p * target, max(1, round(p * len(tokens))))` positions at most (p =
   `masking_probability`). The candidates are the non-`[CLS]`/`[SEP]` positions (with
   whole-word masking, a `##` piece joins its word). The candidate list is shuffled; for each
   candidate in turn an n-gram size is drawn (`choice` of 1..`masking_max_ngram` with
   probabilities proportional to 1/n), shrunk until it fits the budget, and the n consecutive
   candidates from there are masked unless one of them already is. Each masked token becomes
   `[MASK]` when `random() < 0.8`, else a token `randint(0, vocab_size)` when
   `random() >= 0.5`, else stays (the 80/10/10 rule).

*Cache.* With `path_to_cache` set, the mapping is saved as `.npy` under the md5 of a JSON
description (the sequence lengths' and document boundaries' md5, the split's documents, the
samples asked and the settings it depends on), stored next to it and compared on load; a
mismatch rebuilds with a warning; files are written atomically, the description last.

What a sample is
----------------

`dataset[i]` is a dict of tensors ready for `transformers.BertForPreTraining`:
`input_ids` (int64 `[seq_length]`, padded with `pad_token_id`), `token_type_ids` (0 for
padding), `attention_mask` (1 on tokens, 0 on padding), `labels` (the original token at each
masked position, **-100** elsewhere: transformers' ignore index, where Megatron uses -1),
`next_sentence_label` (scalar int64, 1 when A and B were swapped; left out without
sentence-order prediction, as `BertForMaskedLM` does not take it) and `loss_mask` (float32, 1
on the masked positions). `BertDataset.get_example` gives the same as numpy arrays plus
`truncated` and `masked_positions`.

Megatron-Core's quirks kept for sample compatibility: the random replacement token may be any
id, `[PAD]`/`[CLS]`/`[SEP]`/`[MASK]` included; with whole-word masking a `##` piece
right after a `[SEP]` joins the word before that `[SEP]`; `len(tokens)` in the masking
budget counts the special tokens.

Differences from Megatron-Core, on purpose: clear `BertDatasetError` instead of a hang
or an assert for an empty split, data without sentence splitting (every document one sequence),
a split where no document can make a sample, `seq_length < 5` or a seed outside `1..2**31-1`;
padding is `pad_token_id` with labels -100 (Megatron pads with 0, writes `pad` ids into
its `types`/`padding_mask` and turns any *data* token equal to the pad id into 0 and
unmaskable padding: megahf keeps data tokens as they are); the random replacement token is
`randint(0, vocab_size)` itself, where Megatron indexes its `inv_vocab` keys (the same for
a WordPiece vocabulary whose ids are `0..V-1` in order), and a random draw of the pad id is
attended to (Megatron's padding mask hides it); `num_samples=None` builds one pass (Megatron-Core
fails on it). Only Megatron-LM's BERT masking is implemented: no n-gram permutation, no
geometric (SpanBERT) spans, no "longer n-grams first". The mapping is built in Python (about 1
million rows in a few seconds, ~25x slower than Megatron's C++): set `path_to_cache` for
large corpora.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MegahfError
from .index_cache import load_or_build
from .gpt_dataset import (
    SPLIT_NAMES,
    _describe_range,
    _lengths_md5,
    _without_split,
    parse_split,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BertDataset",
    "BertDatasetConfig",
    "BertDatasetError",
    "MT19937",
    "MT19937_64",
    "build_bert_sample_mapping",
]

#: Bumped whenever the cached mapping's meaning changes.
CACHE_FORMAT = 1
#: Megatron skips documents with a sentence longer than this (helpers.cpp LONG_SENTENCE_LEN).
LONG_SENTENCE_LEN = 512
#: transformers' ignore index for the MLM labels.
IGNORE_INDEX = -100
_INT32_MAX = int(np.iinfo(np.int32).max)


class BertDatasetError(MegahfError, ValueError):
    """A BERT dataset that cannot be built as asked; the message says why and what to change."""


# --------------------------------------------------------------------------------------- config
@dataclass
class BertDatasetConfig:
    """Settings of a `BertDataset` (Megatron-Core's `BERTMaskedWordPieceDatasetConfig`
    with Megatron-LM's BERT defaults; `seq_length` = `sequence_length`, `seed` =
    `random_seed`, `sentence_order_prediction` = `classification_head` /
    `--bert-binary-head`, `whole_word_masking` = `masking_do_full_word`). The special token
    ids and `vocab_size` come from the tokenizer: `from_tokenizer` reads them."""

    seq_length: int
    """Tokens per sample, `[CLS]` and `[SEP]` included (Megatron-LM's `--seq-length`)."""
    vocab_size: int
    """Random replacement tokens are drawn from `0..vocab_size-1`."""
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    pad_token_id: int
    seed: int = 1234
    """Seed of the mapping's generators and, plus the sample index, of each sample's draws."""
    split: str = "969,30,1"
    """Train, valid, test weights over *documents* (Megatron-LM's `--split`)."""
    masking_probability: float = 0.15
    """Megatron-LM's `--mask-prob`."""
    short_sequence_probability: float = 0.1
    """Megatron-LM's `--short-seq-prob`: chance of a sample with a random shorter target."""
    masking_max_ngram: int = 3
    """Largest n-gram masked at once (Megatron-LM's BERT uses 3)."""
    whole_word_masking: bool = False
    """Mask whole words (a `##` piece goes with its word); needs `vocab`."""
    vocab: Optional[Sequence[str]] = None
    """The token strings by id; only read for `whole_word_masking`."""
    sentence_order_prediction: bool = True
    """Split each sample in segments A and B and swap them half of the time (the SOP task)."""
    path_to_cache: Optional[str] = None
    """Folder for the sample mapping (`.npy`); None builds it in memory every time."""

    def __post_init__(self) -> None:
        def _int(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise BertDatasetError(f"{name} must be an integer, got {v!r}")
            return int(v)

        seq = _int("seq_length")
        if seq < 5:
            raise BertDatasetError(
                f"seq_length {seq} is too small: a BERT sample is [CLS] A [SEP] B [SEP], so it "
                f"needs at least 5 tokens (2 for the sentences); use e.g. 128 or 512"
            )
        if seq > _INT32_MAX:
            raise BertDatasetError(f"seq_length {seq} does not fit int32")
        if _int("vocab_size") < 1:
            raise BertDatasetError(f"vocab_size must be positive, got {self.vocab_size}")
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            _int(name)
        seed = _int("seed")
        if not 0 < seed <= _INT32_MAX:
            raise BertDatasetError(
                f"seed must be in 1..{_INT32_MAX} (Megatron's sample mapping seeds a Mersenne "
                f"Twister with a positive int32), got {seed}"
            )
        parse_split(self.split)  # validates
        if not 0.0 < float(self.masking_probability) < 1.0:
            raise BertDatasetError(f"masking_probability must be in (0, 1), got {self.masking_probability}")
        if not 0.0 <= float(self.short_sequence_probability) <= 1.0:
            raise BertDatasetError(
                f"short_sequence_probability must be in [0, 1], got {self.short_sequence_probability}"
            )
        if _int("masking_max_ngram") < 1:
            raise BertDatasetError(f"masking_max_ngram must be at least 1, got {self.masking_max_ngram}")
        if self.whole_word_masking and self.vocab is None:
            raise BertDatasetError(
                "whole_word_masking needs vocab (the token strings by id, to find '##' pieces); "
                "BertDatasetConfig.from_tokenizer fills it"
            )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, seq_length: int, **kwargs: Any) -> "BertDatasetConfig":
        """A config with the special ids and vocabulary size of a Hugging Face (WordPiece)
        tokenizer; `vocab` is filled when `whole_word_masking=True`."""
        ids = {}
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            value = kwargs.pop(name, None)
            if value is None:
                value = getattr(tokenizer, name, None)
            if value is None:
                raise BertDatasetError(f"the tokenizer has no {name}; pass {name}=... explicitly")
            ids[name] = int(value)
        vocab_size = kwargs.pop("vocab_size", None)
        if vocab_size is None:
            vocab_size = len(tokenizer)
        if kwargs.get("whole_word_masking") and kwargs.get("vocab") is None:
            kwargs["vocab"] = list(tokenizer.convert_ids_to_tokens(list(range(int(vocab_size)))))
        return cls(seq_length=seq_length, vocab_size=int(vocab_size), **ids, **kwargs)

    @property
    def min_sentences(self) -> int:
        """Sentences a document needs to make a sample (2 with sentence-order prediction)."""
        return 2 if self.sentence_order_prediction else 1

    @property
    def max_seq_length(self) -> int:
        """The target length of a full sample's sentences (`seq_length` less 3 special tokens)."""
        return int(self.seq_length) - 3


# ------------------------------------------------------------------------- Mersenne Twisters
class MT19937:
    """`std::mt19937(seed)`'s outputs (numpy's legacy seeding is the same algorithm)."""

    def __init__(self, seed: int, block: int = 4096) -> None:
        self._gen = np.random.RandomState(int(seed) & 0xFFFFFFFF)._bit_generator
        self._block = block
        self._buf: List[int] = []
        self._pos = 0

    def __call__(self) -> int:
        if self._pos >= len(self._buf):
            self._buf = self._gen.random_raw(self._block).tolist()
            self._pos = 0
        v = self._buf[self._pos]
        self._pos += 1
        return v


class MT19937_64:
    """`std::mt19937_64(seed)`'s outputs, generated 312 at a time in numpy."""

    _N, _M = 312, 156
    _A = np.uint64(0xB5026F5AA96619E9)
    _UPPER = np.uint64(0xFFFFFFFF80000000)
    _LOWER = np.uint64(0x7FFFFFFF)

    def __init__(self, seed: int) -> None:
        self._pending = np.zeros(0, dtype=np.uint64)
        mt = [int(seed) & 0xFFFFFFFFFFFFFFFF]
        for i in range(1, self._N):
            prev = mt[-1]
            mt.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & 0xFFFFFFFFFFFFFFFF)
        self._mt = np.array(mt, dtype=np.uint64)

    def _mix(self, cur: np.ndarray, nxt: np.ndarray, far: np.ndarray) -> np.ndarray:
        y = (cur & self._UPPER) | (nxt & self._LOWER)
        return far ^ (y >> np.uint64(1)) ^ ((y & np.uint64(1)) * self._A)

    def _twist(self) -> None:
        n, m = self._N, self._M
        old = self._mt
        new = np.empty_like(old)
        new[: n - m] = self._mix(old[: n - m], old[1 : n - m + 1], old[m:])
        new[n - m : n - 1] = self._mix(old[n - m : n - 1], old[n - m + 1 :], new[: m - 1])
        new[n - 1 :] = self._mix(old[n - 1 :], new[:1], new[m - 1 : m])
        self._mt = new

    def take(self, count: int) -> np.ndarray:
        """The next `count` outputs (uint64)."""
        count = int(count)
        blocks = [self._pending]
        for _ in range(-(-max(count - self._pending.shape[0], 0) // self._N)):
            self._twist()
            x = self._mt.copy()
            x ^= (x >> np.uint64(29)) & np.uint64(0x5555555555555555)
            x ^= (x << np.uint64(17)) & np.uint64(0x71D67FFFEDA60000)
            x ^= (x << np.uint64(37)) & np.uint64(0xFFF7EEE000000000)
            x ^= x >> np.uint64(43)
            blocks.append(x)
        out = np.concatenate(blocks)
        self._pending = out[count:]  # the unused outputs of the last block come next
        return out[:count]


# ------------------------------------------------------------------------------ sample mapping
def _short_ratio(p: float) -> int:
    if p <= 0:
        return 0
    return int(min(math.floor(1.0 / p + 0.5), _INT32_MAX))  # C's round(): half away from zero


def build_bert_sample_mapping(
    document_starts: np.ndarray,
    document_ends: np.ndarray,
    sequence_lengths: np.ndarray,
    num_samples: Optional[int],
    max_seq_length: int,
    short_sequence_probability: float,
    seed: int,
    min_sentences: int,
) -> np.ndarray:
    """Megatron's `build_mapping`: rows `(first sentence, end sentence, target length)`, shuffled.

    `document_starts[k]`/`document_ends[k]`: the sentence ids `[start, end)` of the k-th
    document of the split. Whole passes over the documents until `num_samples` rows exist (one
    pass for None). uint32 rows (uint64 for more than 2**32-1 sentences), as Megatron. Raises
    `BertDatasetError` when no document can make a sample.
    """
    sizes = np.asarray(sequence_lengths)
    starts = np.asarray(document_starts, dtype=np.int64)
    ends = np.asarray(document_ends, dtype=np.int64)
    counts = ends - starts
    usable = counts >= min_sentences
    if np.any(usable):
        # a document with a long sentence is skipped (only checked with more than one sentence)
        long_sentence = sizes > LONG_SENTENCE_LEN
        if np.any(long_sentence):
            cum = np.concatenate(([0], np.cumsum(long_sentence, dtype=np.int64)))
            has_long = (cum[ends] - cum[starts]) > 0
            usable &= ~(has_long & (counts > 1))
    docs = [(int(s), int(e)) for s, e in zip(starts[usable], ends[usable])]
    if not docs:
        raise BertDatasetError("no document can make a sample")  # callers explain the reason
    lengths = sizes.tolist() if sizes.size < 50_000_000 else sizes
    ratio = _short_ratio(float(short_sequence_probability))
    max_len = int(max_seq_length)
    gen = MT19937(seed)

    def target() -> int:
        if ratio == 0:
            return max_len
        r = gen()
        return 2 + r % (max_len - 1) if r % ratio == 0 else max_len

    rows: List[Tuple[int, int, int]] = []
    wanted = 1 if num_samples is None else int(num_samples)
    passes = 0
    while len(rows) < wanted and (num_samples is not None or passes == 0):
        passes += 1
        for first, end in docs:
            prev = first
            remain = end - first
            seq_len = 0
            num_sent = 0
            goal = target()
            for sent in range(first, end):
                seq_len += lengths[sent]
                num_sent += 1
                remain -= 1
                if (seq_len >= goal and remain > 1 and num_sent >= min_sentences) or remain == 0:
                    rows.append((prev, sent + 1, goal))
                    prev = sent + 1
                    goal = target()
                    seq_len = 0
                    num_sent = 0
    dtype = np.uint64 if sizes.size > np.iinfo(np.uint32).max else np.uint32
    maps = np.array(rows, dtype=dtype).reshape(-1, 3)
    n = maps.shape[0]
    if n > 1:
        draws = MT19937_64(int(seed) + 1).take(n - 1)
        bound = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
        swap_with = (draws % bound).tolist()
        perm = list(range(n))
        for i, j in zip(range(n - 1, 0, -1), swap_with):
            perm[i], perm[j] = perm[j], perm[i]
        maps = maps[np.asarray(perm, dtype=np.int64)]
    return maps


# -------------------------------------------------------------------------------------- dataset
class BertDataset:
    """Megatron-Core's BERT (masked LM + sentence-order prediction) dataset over one split.

    Args:
        indexed: the token source, written with sentence splitting; needs `sequence_lengths`,
            `document_indices` and `get(idx)` (megahf's and Megatron-Core's
            `IndexedDataset`).
        split_documents: the *document* ids of the split, a `range` (`split_ranges(
            indexed.num_documents, config.split)`) or an array.
        num_samples: samples wanted (the dataset has at least this many: whole passes' worth);
            None for one pass.
        config: `BertDatasetConfig`.
        split_name: `"train"`, `"valid"` or `"test"` (part of the cache key and messages).
    """

    def __init__(
        self,
        indexed: Any,
        split_documents: Union[range, Sequence[int], np.ndarray],
        num_samples: Optional[int],
        config: BertDatasetConfig,
        split_name: str = "train",
    ) -> None:
        if split_name not in SPLIT_NAMES:
            raise BertDatasetError(f"split_name must be one of {SPLIT_NAMES}, got {split_name!r}")
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
                raise BertDatasetError(f"num_samples must be an integer or None, got {num_samples!r}")
            if num_samples <= 0:
                raise BertDatasetError(
                    f"{split_name} split: num_samples must be positive, got {num_samples} "
                    f"(pass None for one pass over the documents, or do not build this split)"
                )
            num_samples = int(num_samples)
        self.indexed = indexed
        self.config = config
        self.split_name = split_name
        self.num_samples = num_samples
        self.prefix = getattr(indexed, "path_prefix", None)
        self.sequence_lengths = np.asarray(indexed.sequence_lengths)
        doc_bounds = np.asarray(indexed.document_indices, dtype=np.int64)
        self.document_indices = doc_bounds
        num_documents = int(doc_bounds.shape[0]) - 1
        if isinstance(split_documents, range):
            if split_documents.step != 1:
                raise BertDatasetError("split_documents must be a contiguous range (step 1)")
            self.indices = np.arange(split_documents.start, split_documents.stop, dtype=np.int64)
        else:
            self.indices = np.asarray(split_documents).astype(np.int64, copy=False).reshape(-1)
        where = f" of {self.prefix!r}" if self.prefix else ""
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= num_documents):
            raise BertDatasetError(
                f"{split_name} split: document ids {int(self.indices.min())}..{int(self.indices.max())} "
                f"outside the dataset's {num_documents} documents"
            )
        if self.indices.size == 0:
            raise BertDatasetError(
                f"the {split_name} split{where} is empty: split {config.split!r} over its "
                f"{num_documents} documents gives the {split_name} split "
                f"{_describe_range(split_documents).replace('sequences', 'documents')}. Give "
                f"{split_name} a larger weight in the split string, use a larger corpus, or set "
                f"its weight to 0 ({_without_split(config.split, split_name)!r}) to not build it"
            )
        starts = doc_bounds[self.indices]
        ends = doc_bounds[self.indices + 1]
        counts = ends - starts
        min_sent = config.min_sentences
        if int(self.sequence_lengths.shape[0]) == num_documents and num_documents > 0 and min_sent > 1:
            raise BertDatasetError(
                f"the indexed dataset{where} has one sequence per document ({num_documents} of "
                f"each): it was not written with sentence splitting. BERT's sentence-order "
                f"prediction needs documents of several sentences: preprocess the corpus with "
                f"--split-sentences (megahf preprocess ... --split-sentences, files named "
                f"*_sentence), or set sentence_order_prediction=False"
            )
        if min_sent > 1 and int(counts.max()) < min_sent:
            raise BertDatasetError(
                f"the {split_name} split{where}: all of its {self.indices.size} documents have a "
                f"single sentence (or none); sentence-order prediction needs documents of at least "
                f"2 sentences. Was the corpus preprocessed with --split-sentences? Otherwise set "
                f"sentence_order_prediction=False"
            )
        self._starts, self._ends = starts, ends
        self.sample_index = self._build_or_load()
        self._setup()

    # ----------------------------------------------------------------------- construction
    def _describe(self) -> str:
        indices = self.indices
        contiguous = bool(np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size)))
        cfg = self.config
        desc = {
            "class": "megahf.data.BertDataset",
            "format": CACHE_FORMAT,
            "num_sequences": int(self.sequence_lengths.shape[0]),
            "sequence_lengths_md5": _lengths_md5(self.indexed, self.sequence_lengths),
            "document_indices_md5": hashlib.md5(
                np.ascontiguousarray(self.document_indices).view(np.uint8)
            ).hexdigest(),
            "split_documents": (
                [int(indices[0]), int(indices[0]) + int(indices.size)]
                if contiguous
                else hashlib.md5(np.ascontiguousarray(indices).view(np.uint8)).hexdigest()
            ),
            "split_name": self.split_name,
            "num_samples": self.num_samples,
            "seq_length": int(cfg.seq_length),
            "seed": int(cfg.seed),
            "short_sequence_probability": float(cfg.short_sequence_probability),
            "min_sentences": cfg.min_sentences,
        }
        return json.dumps(desc, indent=4)

    def description(self) -> Dict[str, Any]:
        """What the sample mapping depends on (the cache key is the md5 of its JSON)."""
        return json.loads(self._describe())

    def _build(self) -> np.ndarray:
        cfg = self.config
        try:
            return build_bert_sample_mapping(
                self._starts,
                self._ends,
                self.sequence_lengths,
                self.num_samples,
                cfg.max_seq_length,
                cfg.short_sequence_probability,
                cfg.seed,
                cfg.min_sentences,
            )
        except BertDatasetError:
            where = f" of {self.prefix!r}" if self.prefix else ""
            raise BertDatasetError(
                f"the {self.split_name} split{where} has no document that can make a "
                f"sample: each needs at least {cfg.min_sentences} sentence(s) and no sentence over "
                f"{LONG_SENTENCE_LEN} tokens (Megatron skips the others; with num_samples set it "
                f"would loop for ever). Check the preprocessing (--split-sentences) and the split"
            ) from None

    def _build_or_load(self) -> np.ndarray:
        folder = self.config.path_to_cache
        (sample_index,), self.cache_paths, self.loaded_from_cache = load_or_build(
            folder,
            f"BertDataset-{self.split_name}",
            self._describe() if folder else "",
            ("sample_index",),
            lambda: (self._build(),),
            lambda a: a.ndim == 2 and a.shape[1] == 3 and a.dtype in (np.uint32, np.uint64),
        )
        return sample_index

    def _setup(self) -> None:
        cfg = self.config
        nvals = np.arange(int(cfg.masking_max_ngram), dtype=np.int64) + 1
        probs = 1.0 / nvals
        probs = probs / probs.sum(keepdims=True)
        self._ngram_values = nvals
        self._ngram_probs = probs / probs.sum(keepdims=True)
        self._continuation = None
        if cfg.whole_word_masking:
            self._continuation = np.array([str(t).startswith("##") for t in cfg.vocab], dtype=bool)

    # ----------------------------------------------------------------------- samples
    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def _mask_tokens(
        self, tokens: List[int], target: int, rng: np.random.RandomState
    ) -> Tuple[List[int], List[Tuple[int, int]]]:
        cfg = self.config
        cls_id, sep_id = cfg.cls_token_id, cfg.sep_token_id
        cont = self._continuation
        candidates: List[List[int]] = []
        for pos, tok in enumerate(tokens):
            if tok == cls_id or tok == sep_id:
                continue
            if cont is not None and candidates and 0 <= tok < cont.shape[0] and cont[tok]:
                candidates[-1].append(pos)
            else:
                candidates.append([pos])
        p = float(cfg.masking_probability)
        budget = min(p * target, max(1, int(round(len(tokens) * p))))
        order = np.arange(len(candidates))
        rng.shuffle(order)
        nvals, probs = self._ngram_values, self._ngram_probs
        out = list(tokens)
        masked: List[Tuple[int, int]] = []
        taken = set()
        for c in order.tolist():
            if len(masked) >= budget:
                break
            n = int(rng.choice(nvals, p=probs))
            while True:
                span = [pos for cand in candidates[c : c + n] for pos in cand]
                n -= 1
                if budget >= len(masked) + len(span):
                    break
                if n == 0:
                    span = None
                    break
            if span is None or any(pos in taken for pos in span):
                continue
            for pos in span:
                taken.add(pos)
                if rng.random() < 0.8:
                    out[pos] = cfg.mask_token_id
                elif rng.random() >= 0.5:
                    out[pos] = int(rng.randint(0, cfg.vocab_size))
                masked.append((pos, tokens[pos]))
        masked.sort()
        return out, masked

    def get_example(self, idx: int) -> Dict[str, Any]:
        """Sample `idx` as numpy arrays (see the module docstring) plus `truncated` (bool)
        and `masked_positions` (int64, ascending)."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {idx} out of range for the {self.split_name} split ({n} samples)")
        cfg = self.config
        first, end, target = (int(v) for v in self.sample_index[i])
        sentences = [np.asarray(self.indexed.get(s), dtype=np.int64).tolist() for s in range(first, end)]
        rng = np.random.RandomState((int(cfg.seed) + i) % 2**32)
        pivot = len(sentences)
        swapped = False
        if cfg.sentence_order_prediction:
            pivot = 1
            if len(sentences) >= 3:
                pivot = int(rng.randint(low=1, high=len(sentences)))
            swapped = bool(rng.random() < 0.5)
        seg_a = [t for s in sentences[:pivot] for t in s]
        seg_b = [t for s in sentences[pivot:] for t in s]
        if swapped:
            seg_a, seg_b = seg_b, seg_a
        # trim: [a0, a1) and [b0, b1) of the segments
        a0, a1, b0, b1 = 0, len(seg_a), 0, len(seg_b)
        truncated = a1 + b1 > target
        while (a1 - a0) + (b1 - b0) > target:
            front = rng.random() < 0.5
            if (a1 - a0) > (b1 - b0):
                if front:
                    a0 += 1
                else:
                    a1 -= 1
            elif front:
                b0 += 1
            else:
                b1 -= 1
        seg_a, seg_b = seg_a[a0:a1], seg_b[b0:b1]
        tokens = [cfg.cls_token_id, *seg_a, cfg.sep_token_id]
        types = [0] * len(tokens)
        if seg_b:
            tokens += [*seg_b, cfg.sep_token_id]
            types += [1] * (len(seg_b) + 1)
        masked_tokens, masked = self._mask_tokens(tokens, target, rng)
        seq = int(cfg.seq_length)
        length = len(masked_tokens)
        assert length <= seq
        input_ids = np.full(seq, cfg.pad_token_id, dtype=np.int64)
        input_ids[:length] = masked_tokens
        token_type_ids = np.zeros(seq, dtype=np.int64)
        token_type_ids[:length] = types
        attention_mask = np.zeros(seq, dtype=np.int64)
        attention_mask[:length] = 1
        positions = np.array([p for p, _ in masked], dtype=np.int64)
        labels = np.full(seq, IGNORE_INDEX, dtype=np.int64)
        labels[positions] = np.array([t for _, t in masked], dtype=np.int64)
        loss_mask = np.zeros(seq, dtype=np.float32)
        loss_mask[positions] = 1.0
        out: Dict[str, Any] = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "loss_mask": loss_mask,
        }
        if cfg.sentence_order_prediction:
            out["next_sentence_label"] = np.int64(int(swapped))
        out["truncated"] = bool(truncated)
        out["masked_positions"] = positions
        return out

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        import torch  # here, not at the top: megahf.data stays numpy-only for the CLI and the data tools

        ex = self.get_example(idx)
        out = {
            k: torch.from_numpy(ex[k])
            for k in ("input_ids", "token_type_ids", "attention_mask", "labels", "loss_mask")
        }
        if "next_sentence_label" in ex:
            out["next_sentence_label"] = torch.tensor(int(ex["next_sentence_label"]), dtype=torch.long)
        return out

    # ----------------------------------------------------------------------- pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["sequence_lengths"] = state["document_indices"] = None  # views of the reader's map
        state["_starts"] = state["_ends"] = None
        if self.loaded_from_cache and self.cache_paths:
            state["sample_index"] = None  # reopened from the cache file
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sequence_lengths = np.asarray(self.indexed.sequence_lengths)
        self.document_indices = np.asarray(self.indexed.document_indices, dtype=np.int64)
        self._starts = self.document_indices[self.indices]
        self._ends = self.document_indices[self.indices + 1]
        if self.sample_index is None:
            self.sample_index = np.load(self.cache_paths["sample_index"], mmap_mode="r")

    def __repr__(self) -> str:
        return (
            f"BertDataset({self.split_name}, documents={self.indices.size}, samples={len(self)}, "
            f"seq_length={self.config.seq_length})"
        )
