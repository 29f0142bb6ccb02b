"""What a `data_path` entry may name, opened and checked before any sample is read (`open_token_data`):

* a prefix `P` of a Megatron pair `P.bin`/`P.idx` (`megahf preprocess`, Megatron-LM's `preprocess_data.py`):
  `IndexedDataset`;
* a `.ds` token file of datatrove's `DocumentTokenizer` (nanotron's format: the tokens back to back, uint16 or
  uint32 little-endian, with `{file}.index`, the uint64 token count at the end of each document, and optionally
  `{file}.metadata`, "tokenizer|bytes per token" then the token count): `DatatroveTokenFile`, one sequence per
  document;
* the output of one datatrove tokenizer run: a folder of `.ds` files, or of the `NNNNN_tokens.bin/.idx` pairs that
  datatrove's `MegatronDocumentTokenizer` writes (one per task), or the prefix `P` of pairs `P_NNNNN_tokens.bin/.idx`:
  `TokenFileSet`, its files read as one dataset in task order, as if merged into one pair.

Every file is checked as `IndexedDataset` checks megahf's own: sizes that match (a `.ds` holds exactly the tokens its
index ends at, in 2 or 4 bytes each, as its metadata says), document ends that never decrease, one dtype across a
set; and, given the tokenizer's vocabulary size, a token width that can hold every id (`check_vocabulary`).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, List, Optional, Union

import numpy as np

from .indexed_dataset import (IndexedDataset, IndexedDatasetError, IndexedDatasetNotFoundError, PathLike, _open_map)

#: Bytes per token of a `.ds` file -> its dtype (datatrove writes struct "H" or "I", little-endian).
DS_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_PAIR = re.compile(r"(^|_)\d{5,}_tokens$")
FORMS = ("a prefix P of P.bin/P.idx (megahf preprocess), a .ds file of datatrove's DocumentTokenizer, or a folder "
         "(or prefix P of P_NNNNN_tokens.bin/.idx pairs) holding one datatrove tokenizer run's files")


def _natural_key(path: str) -> list:
    """`x_2_tokens` before `x_10_tokens`: numbers compared as numbers (task ranks past 99999 have 6 digits)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


class DatatroveTokenFile(IndexedDataset):
    """A `.ds` token file of datatrove's `DocumentTokenizer`, read like `IndexedDataset` (one sequence per document,
    `document_indices` 0..n), checked at open against its `.index` and `.metadata`."""

    def _open(self) -> None:
        path = self.path_prefix
        index = path + ".index"
        for p in (path, index):
            if not os.path.isfile(p):
                why = ("" if p == path else "; datatrove's DocumentTokenizer writes it with save_index=True (its "
                       "default): without it the documents' boundaries are unknown")
                raise IndexedDatasetNotFoundError(f"datatrove token file {path!r}: missing {p!r}{why}")
        imap = _open_map(index)
        if len(imap) == 0 or len(imap) % 8:
            raise IndexedDatasetError(f"{index}: {len(imap)} bytes, not a whole number (at least 1) of uint64 "
                                      "document ends; the index is damaged or not datatrove's")
        ends = np.frombuffer(imap, dtype="<u8")
        down = np.flatnonzero(ends[1:] < ends[:-1])
        if down.size:
            j = int(down[0]) + 1
            raise IndexedDatasetError(f"{index}: corrupt index: document {j} ends at token {int(ends[j])}, before the "
                                      f"document ahead of it ({int(ends[j - 1])}); document ends must not decrease")
        total = int(ends[-1])
        tmap = _open_map(path)
        size = len(tmap)
        width = self._token_width(path, total, size)
        if size != total * width:
            raise IndexedDatasetError(
                f"{path}: {size} bytes, but its index ends at token {total:,} ({total * width} bytes at {width} bytes "
                f"per token): the file is {'truncated' if size < total * width else 'longer than its index'}, or the "
                "two come from different runs")
        self.dtype = DS_DTYPES[width]
        lengths = np.diff(ends, prepend=np.uint64(0))
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{index}: a document of {int(lengths.max()):,} tokens exceeds int32 lengths")
        self.sequence_lengths = lengths.astype(np.int32)
        self.sequence_pointers = (ends - lengths).astype(np.int64) * width
        self.document_indices = np.arange(ends.shape[0] + 1, dtype=np.int64)
        self.sequence_modes = None
        self._tokens = np.frombuffer(tmap, dtype=self.dtype, count=total)

    @staticmethod
    def _token_width(path: str, total: int, size: int) -> int:
        """Bytes per token: from `{path}.metadata` when datatrove wrote it (checked against the token count), else
        the file size over the token count."""
        meta = path + ".metadata"
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                lines = f.read().splitlines()
            try:
                width, count = int(lines[0].rsplit("|", 1)[1]), int(lines[1])
            except (IndexError, ValueError):
                raise IndexedDatasetError(f"{meta}: not datatrove's metadata (expected 'tokenizer|bytes per token' "
                                          "then the token count)") from None
            if width not in DS_DTYPES or count != total:
                raise IndexedDatasetError(
                    f"{meta}: says {count:,} tokens of {width} bytes, but {path}.index ends at token {total:,} (and "
                    f"datatrove writes 2 or 4 bytes per token); the files come from different runs")
            return width
        width = size // total if total else 0
        if total == 0 or width not in DS_DTYPES or width * total != size:
            raise IndexedDatasetError(f"{path}: {size} bytes for {total:,} tokens is neither 2 nor 4 bytes per token "
                                      "(and no .metadata says which); the file or its .index is damaged")
        return width

    def __repr__(self) -> str:
        if "_tokens" not in self.__dict__:
            return f"DatatroveTokenFile({self.path_prefix!r}, closed)"
        return f"DatatroveTokenFile({self.path_prefix!r}, documents={len(self)}, tokens={self.num_tokens})"


class TokenFileSet:
    """The token files of one datatrove run (`datatrove_files`) read as one dataset, in task order: the sequences
    and documents of the first file, then of the next... (what one merged pair would hold). Reads go through `get`."""

    def __init__(self, path_prefix: PathLike, files: Optional[List[str]] = None) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self.files = list(files) if files is not None else datatrove_files(self.path_prefix)
        self._open()

    def _open(self) -> None:
        if not self.files:
            raise IndexedDatasetNotFoundError(f"{self.path_prefix!r}: no datatrove token files; give {FORMS}")
        self.parts = [_open_one(f) for f in self.files]
        dtypes = {p.dtype for p in self.parts}
        if len(dtypes) > 1:
            raise IndexedDatasetError(f"{self.path_prefix}: its files hold tokens of different widths ("
                                      f"{', '.join(sorted(map(str, dtypes)))}): they come from different runs")
        self.dtype = self.parts[0].dtype
        self.sequence_lengths = np.concatenate([p.sequence_lengths for p in self.parts])
        counts = np.array([len(p) for p in self.parts], dtype=np.int64)
        self._starts = np.concatenate(([0], np.cumsum(counts)))
        self.document_indices = np.concatenate(
            [[0]] + [p.document_indices[1:] + s for p, s in zip(self.parts, self._starts[:-1])]).astype(np.int64)
        self.sequence_modes = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    def _locate(self, idx: Union[int, np.integer]) -> tuple:
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix!r} ({len(self)} sequences)")
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[part], i - int(self._starts[part])

    def __getitem__(self, idx: Union[int, np.integer]) -> np.ndarray:
        part, i = self._locate(idx)
        return part[i]

    def get(self, idx: Union[int, np.integer], offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        part, i = self._locate(idx)
        return part.get(i, offset, length)

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __repr__(self) -> str:
        return f"TokenFileSet({self.path_prefix!r}, files={len(self.files)}, sequences={len(self)})"


def _open_one(path: str) -> IndexedDataset:
    return DatatroveTokenFile(path) if path.endswith(".ds") else IndexedDataset(path)


def datatrove_files(path: str) -> List[str]:
    """The token files of one datatrove run that `path` names, in task order: the `.ds` files of a folder, or the
    `NNNNN_tokens` pairs (as prefixes) of a folder or of the prefix `path`; [] when there are none."""
    if os.path.isdir(path):
        ds = glob.glob(os.path.join(glob.escape(path), "*.ds"))
        pairs = [p[:-4] for p in glob.glob(os.path.join(glob.escape(path), "*_tokens.idx"))
                 if _PAIR.search(os.path.basename(p[:-4]))]
        if ds and pairs:
            raise IndexedDatasetError(f"{path}: holds both .ds files and Megatron _tokens pairs; give the folder of "
                                      "one datatrove run (or name a .ds file or a pair's prefix)")
        return sorted(ds or pairs, key=_natural_key)
    pairs = [p[:-4] for p in glob.glob(glob.escape(path) + "_*_tokens.idx")
             if _PAIR.search(os.path.basename(p[:-4])) and re.fullmatch(r"_\d{5,}_tokens", p[len(path):-4])]
    return sorted(pairs, key=_natural_key)


def find_token_data(path: str) -> Optional[str]:
    """What kind of token data `path` names ("indexed", "ds", "datatrove-set"), without opening it; None if none."""
    if IndexedDataset.exists(path):
        return "indexed"
    if path.endswith(".ds") and os.path.isfile(path):
        return "ds"
    try:
        return "datatrove-set" if datatrove_files(path) else None
    except IndexedDatasetError:
        return "datatrove-set"  # ambiguous: opening it says why


def check_vocabulary(data: Any, vocab_size: int, where: str) -> None:
    """Refuse data whose token width cannot hold the tokenizer's ids (0 .. vocab_size - 1): it was tokenized with
    another, smaller tokenizer."""
    dtype = np.dtype(data.dtype)
    if dtype.kind in "iu" and vocab_size - 1 > np.iinfo(dtype).max:
        raise IndexedDatasetError(
            f"{where}: holds {dtype} tokens (ids up to {np.iinfo(dtype).max:,}) but the tokenizer has {vocab_size:,} "
            "ids: the data was tokenized with another tokenizer; tokenize it again with this one (megahf "
            "preprocess), or train with the tokenizer it was made with")


def open_token_data(path: PathLike, vocab_size: Optional[int] = None) -> Any:
    """Open what the `data_path` entry `path` names (see the module docstring), checked; with `vocab_size`, also
    against the tokenizer's vocabulary (`check_vocabulary`)."""
    path = os.fspath(path)
    kind = find_token_data(path)
    if kind == "indexed":
        data = IndexedDataset(path)
    elif kind == "ds":
        data = DatatroveTokenFile(path)
    elif kind == "datatrove-set":
        files = datatrove_files(path)
        data = _open_one(files[0]) if len(files) == 1 else TokenFileSet(path, files)
    else:
        try:
            IndexedDataset(path)  # raises IndexedDatasetNotFoundError, with a hint when the prefix looks mistyped
        except IndexedDatasetNotFoundError as e:
            raise IndexedDatasetNotFoundError(f"{e} (a data path may be {FORMS})") from None
        raise AssertionError(path)  # pragma: no cover
    if vocab_size is not None:
        check_vocabulary(data, vocab_size, path)
    return data


__all__ = ["DS_DTYPES", "FORMS", "DatatroveTokenFile", "TokenFileSet", "check_vocabulary", "datatrove_files",
           "find_token_data", "open_token_data"]
