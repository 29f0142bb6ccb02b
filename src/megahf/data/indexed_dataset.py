"""Megatron-Core's indexed dataset (`{prefix}.bin` + `{prefix}.idx`), read and written by numpy.

The files are byte-compatible with `megatron.core.datasets.indexed_dataset` (checked against
megatron-core 0.16.1 in `tests/data/test_indexed_dataset.py`):

`{prefix}.bin`
    every sequence's tokens back to back, in the dtype named by the index, little-endian.
`{prefix}.idx` (all integers little-endian)
    ======  ==========================  =====================================================
    bytes   field                       meaning
    ======  ==========================  =====================================================
    9       magic                       `b"MMIDIDX\\x00\\x00"`
    8       version (u64)               always 1
    1       dtype code (u8)             `DTYPE_CODES`
    8       sequence count N (u64)
    8       document count D (u64)      length of the document index array (documents + 1)
    4 N     sequence lengths (int32)    tokens per sequence
    8 N     sequence pointers (int64)   byte offset of each sequence in the `.bin`
    8 D     document indices (int64)    `[0, end of doc 0, end of doc 1, ...]` in sequences
    N       sequence modes (int8)       optional (Megatron's "multimodal" datasets only)
    ======  ==========================  =====================================================

A *sequence* is what `ds[i]` returns (a whole document, or one sentence when the corpus was
split into sentences); documents group consecutive sequences.

Differences from Megatron-Core's reader, all on the side of safety:

* both files are checked when the dataset is opened, before any sample is read: magic, version
  and dtype code; an `.idx` whose size is exactly what its header announces; every sequence
  length `>= 0`; every sequence pointer equal to the running sum of the lengths before it (which
  is how Megatron-Core writes them, so a damaged pointer anywhere, or one past the end of the
  `.bin`, is caught); document indices that start at 0, never decrease and end at the sequence
  count; and a `.bin` of exactly `sum(lengths) x dtype size` bytes (which also catches an `.idx`
  and a `.bin` from different datasets). The checks are vectorised, in bounded chunks: opening
  stays cheap on large indexes. Every inconsistency raises `IndexedDatasetError` naming the
  file and the problem (a missing file `IndexedDatasetNotFoundError`, also a
  `FileNotFoundError`), instead of an `assert` or a silent wrong read;
* arrays returned by `ds[i]` / `ds.get` keep the memory map alive through their `.base`:
  they stay valid after the dataset object is garbage-collected (Megatron-Core closes the map in
  `__del__` and a surviving view then segfaults);
* whether the optional modes are present is read off the `.idx` size, not passed in.

The writer (`IndexedDatasetBuilder`) writes to temporary names and renames both files
only when `IndexedDatasetBuilder.finalize` completes, so an interrupted run never leaves a
pair of files that looks finished.
"""

from __future__ import annotations

import array
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from ..atomic import temporary_name
from ..errors import MegahfError

__all__ = [
    "DTYPE_CODES",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "IndexedDatasetNotFoundError",
    "best_dtype",
    "bin_path",
    "dtype_code",
    "idx_path",
]

#: First 9 bytes of every `.idx` file.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
#: The only version Megatron-Core writes or reads.
INDEX_VERSION = 1
#: Megatron-Core's dtype codes (`megatron.core.datasets.indexed_dataset.DType`).
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}

# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
_HEADER_SIZE = 34
_INT32_MAX = np.iinfo(np.int32).max
_LITTLE = np.little_endian
# Index entries checked per step at open: vectorised, with temporaries of a few tens of MB whatever the index size.
_CHECK_CHUNK = 1 << 22

PathLike = Union[str, "os.PathLike[str]"]


class IndexedDatasetError(MegahfError, ValueError):
    """A `.bin`/`.idx` pair that cannot be read or written as asked; the message names the file."""


class IndexedDatasetNotFoundError(IndexedDatasetError, FileNotFoundError):
    """`{prefix}.idx` or `{prefix}.bin` does not exist; the message names what is missing and the likely prefix."""


def idx_path(path_prefix: PathLike) -> str:
    """`{prefix}.idx`."""
    return os.fspath(path_prefix) + ".idx"


def bin_path(path_prefix: PathLike) -> str:
    """`{prefix}.bin`."""
    return os.fspath(path_prefix) + ".bin"


def dtype_code(dtype: Any) -> int:
    """Megatron-Core's code for `dtype` (e.g. `np.uint16` -> 8)."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in _CODE_OF_DTYPE)
        raise IndexedDatasetError(f"dtype {dt} has no Megatron code; use one of: {names}")
    return _CODE_OF_DTYPE[dt]


def best_dtype(vocab_size: Optional[int]) -> np.dtype:
    """The token dtype Megatron-Core picks for a vocabulary: uint16 under 65,500 entries, else int32.

    This is `DType.optimal_dtype`'s rule (note the threshold is 65,500, not 65,536); `None`
    (unknown vocabulary) gives int32.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _fits(values: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Raise unless every value of the integer array `values` is representable in `dtype`."""
    if values.size == 0 or dtype.kind == "f":
        return
    info = np.iinfo(dtype)
    lo, hi = values.min(), values.max()
    if lo < info.min or hi > info.max:
        bad = int(hi) if hi > info.max else int(lo)
        fix = "int32" if dtype.itemsize < 4 else "int64"
        raise IndexedDatasetError(
            f"{what}: token id {bad} does not fit dtype {dtype} (range {info.min}..{info.max}); "
            f"write the dataset with dtype={fix} (for preprocessing: --dtype {fix}), or check the "
            f"tokenizer, whose ids should be below its vocabulary size"
        )


def _as_tokens(tokens: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """`tokens` (list, numpy array, torch tensor) as a 1-D C-contiguous array of `dtype`."""
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # a torch tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr.reshape(-1))
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise IndexedDatasetError(f"{what}: tokens must be numbers, got an array of {arr.dtype}")
    arr = arr.reshape(-1)
    if dtype.kind in "iu":
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise IndexedDatasetError(f"{what}: tokens must be integers, got non-integral floats")
        elif arr.dtype.kind == "b":
            arr = arr.astype(np.int64)
        _fits(arr, dtype, what)
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _open_map(path: str) -> Union[mmap.mmap, bytes]:
    """A read-only memory map of `path` (`b""` for an empty file, which cannot be mapped)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _check_files_exist(prefix: str, ipath: str, bpath: str) -> None:
    """Raise IndexedDatasetNotFoundError (a FileNotFoundError) naming what is missing, with the prefix the user
    probably meant."""
    missing = [p for p in (ipath, bpath) if not os.path.isfile(p)]
    if not missing:
        return
    hint = ""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            hint = f"; pass the prefix without the '{suffix}' suffix ({prefix[: -len(suffix)]!r})"
    if not hint:
        near = sorted(Path(prefix).parent.glob(Path(prefix).name + "*_document.idx")) + sorted(
            Path(prefix).parent.glob(Path(prefix).name + "*_sentence.idx")
        )
        if near:
            hint = f"; did you mean the prefix {str(near[0])[:-4]!r} (as written by `megahf preprocess`)?"
    raise IndexedDatasetNotFoundError(
        f"indexed dataset {prefix!r}: missing {' and '.join(repr(p) for p in missing)}{hint}"
    )


def _read_index_header(imap, ipath: str) -> tuple[int, int, int, bool]:
    """(dtype code, sequence count, document-index count, whether modes follow) from a checked header: magic,
    version, dtype code, and a file size that matches the counts exactly."""
    size = len(imap)
    if size < _HEADER_SIZE:
        if size >= len(INDEX_MAGIC) and bytes(imap[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{ipath}: not a Megatron index file (first bytes {bytes(imap[:9])!r}, expected {INDEX_MAGIC!r})"
            )
        raise IndexedDatasetError(
            f"{ipath}: truncated index file ({size} bytes, the header alone takes {_HEADER_SIZE})"
        )
    magic = bytes(imap[:9])
    if magic != INDEX_MAGIC:
        raise IndexedDatasetError(
            f"{ipath}: not a Megatron index file (first bytes {magic!r}, expected {INDEX_MAGIC!r})"
        )
    (version,) = struct.unpack_from("<Q", imap, 9)
    if version != INDEX_VERSION:
        raise IndexedDatasetError(
            f"{ipath}: unsupported index version {version} (only version {INDEX_VERSION} exists)"
        )
    (code,) = struct.unpack_from("<B", imap, 17)
    if code not in DTYPE_CODES:
        known = ", ".join(f"{c}={d}" for c, d in DTYPE_CODES.items())
        raise IndexedDatasetError(f"{ipath}: unknown dtype code {code} (known codes: {known})")
    n, d = struct.unpack_from("<QQ", imap, 18)
    expected = _HEADER_SIZE + 4 * n + 8 * n + 8 * d
    if size == expected:
        has_modes = False
    elif size == expected + n and n > 0:
        has_modes = True
    else:
        kind = "truncated" if size < expected else "has trailing bytes or a corrupt header:"
        raise IndexedDatasetError(
            f"{ipath}: {kind} index file is {size} bytes but its header announces {n} sequences "
            f"and {d} document indices, which take {expected} bytes ({expected + n} with modes)"
        )
    if d < 1:
        raise IndexedDatasetError(f"{ipath}: corrupt index: no document indices (at least [0] is required)")
    return code, n, d, has_modes


def _check_document_indices(docs: np.ndarray, n: int, ipath: str) -> None:
    """Raise unless the document indices start at 0, never decrease and end at the sequence count `n` (so every
    document is a range of existing sequences; equal neighbours are empty documents, which Megatron allows)."""
    if docs[0] != 0 or docs[-1] != n:
        raise IndexedDatasetError(
            f"{ipath}: corrupt index: document indices run from {int(docs[0])} to {int(docs[-1])}, expected 0 to "
            f"the sequence count {n}; the .idx is damaged: write the dataset again (megahf preprocess)"
        )
    for s in range(0, docs.shape[0] - 1, _CHECK_CHUNK):
        chunk = docs[s : s + _CHECK_CHUNK + 1]
        down = np.flatnonzero(chunk[1:] < chunk[:-1])
        if down.size:
            j = s + int(down[0]) + 1
            raise IndexedDatasetError(
                f"{ipath}: corrupt index: document index {j} is {int(docs[j])}, smaller than the one before it "
                f"({int(docs[j - 1])}); document indices must not decrease (0 ... {n}); the .idx is damaged: write "
                "the dataset again (megahf preprocess)"
            )


def _check_pointers(lengths: np.ndarray, pointers: np.ndarray, itemsize: int, ipath: str, bin_size: int) -> int:
    """The number of bytes the index describes, after checking every length (`>= 0`) and every pointer: sequence
    `i` must start at `itemsize * sum(lengths[:i])`, as Megatron-Core writes it. Vectorised over chunks."""
    n = lengths.shape[0]
    offset = 0  # bytes before the current chunk
    first_bad, bad_count = -1, 0
    for s in range(0, n, _CHECK_CHUNK):
        lens = lengths[s : s + _CHECK_CHUNK].astype(np.int64)
        if int(lens.min()) < 0:
            i = s + int(np.flatnonzero(lens < 0)[0])
            raise IndexedDatasetError(
                f"{ipath}: corrupt index: sequence {i} has length {int(lengths[i])}; lengths must be 0 or more; the "
                ".idx is damaged: write the dataset again (megahf preprocess)"
            )
        lens *= itemsize
        starts = np.cumsum(lens)
        starts -= lens
        starts += offset
        bad = np.flatnonzero(pointers[s : s + _CHECK_CHUNK] != starts)
        if bad.size:
            if first_bad < 0:
                first_bad, expected = s + int(bad[0]), int(starts[bad[0]])
            bad_count += int(bad.size)
        offset += int(lens.sum())
    if first_bad >= 0:
        pointer = int(pointers[first_bad])
        past = f", past the end of the {bin_size}-byte .bin" if pointer >= bin_size and pointer > 0 else ""
        raise IndexedDatasetError(
            f"{ipath}: corrupt index: {bad_count} of {n} sequence pointers do not follow from the sequence "
            f"lengths; the first is sequence {first_bad}, which points at byte {pointer}{past} but must start at "
            f"byte {expected}; the .idx is damaged: write the dataset again (megahf preprocess)"
        )
    return offset


class IndexedDataset:
    """Read a Megatron `{prefix}.bin` / `{prefix}.idx` pair through memory maps.

    `len(ds)` is the number of sequences; `ds[i]` is sequence `i` as a read-only numpy
    array (a view into the map, no copy); `ds[a:b]` a list of them; `ds.get(i, offset, length)`
    a slice of one sequence in O(1). `ds.sequence_lengths` (int32), `ds.sequence_pointers`
    (int64 byte offsets), `ds.document_indices` (int64, `num_documents + 1` entries, the first
    0 and the last `len(ds)`) and `ds.sequence_modes` (int8, or None) are views of the index.

    Views hold a reference to the memory map they come from, so they stay valid after `ds`
    is deleted or closed. The object pickles by path (it reopens the files), so it can be handed
    to `torch.utils.data.DataLoader` workers.
    """

    def __init__(self, path_prefix: PathLike) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self._open()

    # ------------------------------------------------------------------ opening and validation
    def _open(self) -> None:
        """Map both files and check them against each other before any sample is read."""
        ipath, bpath = idx_path(self.path_prefix), bin_path(self.path_prefix)
        _check_files_exist(self.path_prefix, ipath, bpath)
        imap = _open_map(ipath)
        code, n, d, has_modes = _read_index_header(imap, ipath)
        self.dtype: np.dtype = DTYPE_CODES[code]
        self._map_index_arrays(imap, ipath, n, d, has_modes)
        self._tokens = self._map_tokens(_open_map(bpath), ipath, bpath)

    def _map_index_arrays(self, imap, ipath: str, n: int, d: int, has_modes: bool) -> None:
        """Views of the index's arrays (lengths, pointers, document indices, modes); the document indices must run
        from 0 to the sequence count."""
        offset = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(imap, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(imap, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(imap, dtype="<i8", count=d, offset=offset)
        offset += 8 * d
        self.sequence_modes = (
            np.frombuffer(imap, dtype=np.int8, count=n, offset=offset) if has_modes else None
        )
        _check_document_indices(self.document_indices, n, ipath)

    def _map_tokens(self, bmap, ipath: str, bpath: str) -> np.ndarray:
        """The `.bin` as one token array, after checking that every pointer is the running sum of the lengths
        before it and that the file holds exactly the bytes they describe."""
        itemsize = self.dtype.itemsize
        total = _check_pointers(self.sequence_lengths, self.sequence_pointers, itemsize, ipath, len(bmap))
        if len(bmap) != total:
            raise IndexedDatasetError(
                f"{bpath}: data file is {len(bmap)} bytes but {ipath} describes {total} bytes "
                f"({int(total // itemsize)} tokens of {self.dtype}); the .bin is "
                f"{'truncated' if len(bmap) < total else 'longer than its index'}, or the two files come from "
                "different datasets; write both again (megahf preprocess), or pair each .idx with its own .bin"
            )
        # Every array handed out is a view of this one; numpy keeps the mmap alive via .base.
        return np.frombuffer(bmap, dtype=self.dtype.newbyteorder("<"), count=total // itemsize)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        """Number of documents (`len(document_indices) - 1`)."""
        return int(self.document_indices.shape[0]) - 1

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the `.bin` in order, as one read-only array (a view of the map, no copy)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in the `.bin`."""
        return int(self._tokens.shape[0])

    def _index(self, idx: Any) -> int:
        if isinstance(idx, (bool, np.bool_)) or not isinstance(idx, (int, np.integer)):
            raise TypeError(f"indexed dataset indices must be integers or slices, not {type(idx).__name__}")
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix!r} ({n} sequences)")
        return i

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, idx: Union[int, np.integer, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous (step 1)")
            if stop <= start:
                return []
            lo = self._start(start)
            hi = self._start(stop - 1) + int(self.sequence_lengths[stop - 1])
            cuts = np.cumsum(self.sequence_lengths[start : stop - 1], dtype=np.int64)
            return np.split(self._tokens[lo:hi], cuts)
        i = self._index(idx)
        s = self._start(i)
        return self._tokens[s : s + int(self.sequence_lengths[i])]

    def get(self, idx: Union[int, np.integer], offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `idx` (to its end when `length` is None)."""
        i = self._index(idx)
        size = int(self.sequence_lengths[i])
        offset = int(offset)
        if length is None:
            length = size - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"get({idx}, offset={offset}, length={length}) reaches outside sequence {idx} "
                f"of {self.path_prefix!r}, which has {size} tokens"
            )
        s = self._start(i) + offset
        return self._tokens[s : s + length]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Drop this object's references to the maps (views handed out stay valid)."""
        for name in ("_tokens", "sequence_lengths", "sequence_pointers", "document_indices", "sequence_modes"):
            self.__dict__.pop(name, None)

    def __enter__(self) -> "IndexedDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __repr__(self) -> str:
        if "_tokens" not in self.__dict__:
            return f"IndexedDataset({self.path_prefix!r}, closed)"
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
            f"tokens={self.num_tokens}, dtype={self.dtype})"
        )

    @staticmethod
    def exists(path_prefix: PathLike) -> bool:
        """Whether both `{prefix}.idx` and `{prefix}.bin` exist."""
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


class IndexedDatasetBuilder:
    """Write a Megatron `.bin`/`.idx` pair, byte for byte as Megatron-Core's builder does.

    `add_item(tokens)` appends one sequence, `end_document()` closes the current document,
    `add_document(tokens, lengths)` appends a whole document made of `len(lengths)`
    sequences, `add_index(prefix)` appends every document of an existing dataset (same dtype),
    `finalize(idx_path)` writes the index. Tokens may be lists, numpy arrays or torch tensors;
    an id that does not fit `dtype` raises `IndexedDatasetError` (Megatron wraps it
    silently).

    Until `finalize` both files live under hidden temporary names in the destination folder;
    `finalize` renames them into place (the `.bin` first, then the `.idx`), so a reader never
    sees a finished-looking pair that is incomplete. `abort()` (also run when the builder is used
    as a context manager and the block raises) deletes the temporary files.
    """

    def __init__(self, bin_path: PathLike, dtype: Any = np.int32, multimodal: bool = False) -> None:
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validates
        self.multimodal = multimodal
        self._bin_tmp = temporary_name(self.bin_path, tag="tmp")
        self._idx_tmp: Optional[str] = None
        self._idx_path: Optional[str] = None
        self._data = open(self._bin_tmp, "wb")
        self._lengths = array.array("i")  # int32, like the index
        self._docs = array.array("q", [0])  # int64
        self._modes: Optional[array.array] = array.array("b") if multimodal else None
        self._state = "open"

    # ------------------------------------------------------------------ adding
    def _check_open(self) -> None:
        if self._state != "open":
            raise IndexedDatasetError(f"{self.bin_path}: builder is {self._state}; nothing more can be added")

    def _write(self, arr: np.ndarray) -> None:
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _LITTLE):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        self._data.write(memoryview(arr).cast("B"))

    def add_item(self, tokens: Any, mode: int = 0) -> None:
        """Append one sequence (call `end_document` to close the document it belongs to)."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype, self.bin_path)
        if arr.size > _INT32_MAX:
            raise IndexedDatasetError(f"{self.bin_path}: a sequence of {arr.size} tokens exceeds the int32 length field")
        self._write(arr)
        self._lengths.append(int(arr.size))
        if self._modes is not None:
            self._modes.append(int(mode))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the previous one)."""
        self._check_open()
        self._docs.append(len(self._lengths))

    def add_document(self, tokens: Any, lengths: Sequence[int], modes: Optional[Sequence[int]] = None) -> None:
        """Append a document: `tokens` is its sequences back to back, `lengths` their sizes."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype, self.bin_path)
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lens.sum()) != arr.size or (lens.size and int(lens.min()) < 0):
            raise IndexedDatasetError(
                f"{self.bin_path}: add_document got {arr.size} tokens but lengths summing to {int(lens.sum())}"
            )
        if lens.size and int(lens.max()) > _INT32_MAX:
            raise IndexedDatasetError(f"{self.bin_path}: a sequence exceeds the int32 length field")
        self._write(arr)
        self._lengths.frombytes(lens.astype("<i4").tobytes())
        self._docs.append(len(self._lengths))
        if self._modes is not None:
            m = [0] * lens.size if modes is None else list(modes)
            if len(m) != lens.size:
                raise IndexedDatasetError(f"{self.bin_path}: {len(m)} modes for {lens.size} sequences")
            self._modes.extend(m)

    def add_documents(self, tokens: Any, lengths: Any, sequences_per_document: Any) -> None:
        """Append many documents at once (a fast path for `megahf.data.preprocess`).

        `tokens`: all sequences back to back; `lengths`: each sequence's size;
        `sequences_per_document`: how many consecutive sequences make each document.
        """
        self._check_open()
        if self._modes is not None:
            raise IndexedDatasetError(f"{self.bin_path}: add_documents does not take modes; use add_document")
        arr = _as_tokens(tokens, self.dtype, self.bin_path)
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        per_doc = np.asarray(sequences_per_document, dtype=np.int64).reshape(-1)
        if int(lens.sum()) != arr.size or int(per_doc.sum()) != lens.size:
            raise IndexedDatasetError(
                f"{self.bin_path}: add_documents got {arr.size} tokens, lengths summing to {int(lens.sum())}, "
                f"{lens.size} sequences and documents holding {int(per_doc.sum())}"
            )
        if lens.size and int(lens.max()) > _INT32_MAX:
            raise IndexedDatasetError(f"{self.bin_path}: a sequence exceeds the int32 length field")
        self._write(arr)
        base = len(self._lengths)
        self._lengths.frombytes(lens.astype("<i4").tobytes())
        self._docs.frombytes((base + np.cumsum(per_doc)).astype("<i8").tobytes())

    def add_index(self, path_prefix: PathLike) -> None:
        """Append every document of the dataset at `path_prefix` (which must have this dtype)."""
        self._check_open()
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {idx_path(path_prefix)} (dtype {other.dtype}) into {self.bin_path} "
                f"(dtype {self.dtype}); merge datasets of one dtype"
            )
        if self.multimodal and other.sequence_modes is None:
            raise IndexedDatasetError(f"cannot merge {idx_path(path_prefix)}: it has no sequence modes")
        base = len(self._lengths)
        self._lengths.frombytes(np.asarray(other.sequence_lengths, dtype="<i4").tobytes())
        self._docs.frombytes((base + np.asarray(other.document_indices[1:], dtype=np.int64)).astype("<i8").tobytes())
        if self._modes is not None:
            self._modes.frombytes(np.asarray(other.sequence_modes, dtype=np.int8).tobytes())
        other.close()
        del other
        with open(bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data, 16 << 20)

    # ------------------------------------------------------------------ finishing
    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._docs) - 1

    def finalize(self, idx_path: PathLike, commit: bool = True) -> None:
        """Write the index to `idx_path`; with `commit` (default) rename both files into place.

        `commit=False` leaves both under their temporary names: call `commit` later (this
        lets a caller finish several builders before publishing any of them).
        """
        self._check_open()
        self._idx_path = os.fspath(idx_path)
        self._idx_tmp = temporary_name(self._idx_path, tag="tmp")
        try:
            self._data.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
            pointers = np.zeros(lengths.shape[0], dtype=np.int64)
            if lengths.shape[0] > 1:
                np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            docs = np.frombuffer(self._docs, dtype=np.int64)
            with open(self._idx_tmp, "wb") as f:
                f.write(INDEX_MAGIC)
                f.write(struct.pack("<Q", INDEX_VERSION))
                f.write(struct.pack("<B", dtype_code(self.dtype)))
                f.write(struct.pack("<Q", lengths.shape[0]))
                f.write(struct.pack("<Q", docs.shape[0]))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(docs.astype("<i8").tobytes())
                if self._modes is not None:
                    f.write(np.frombuffer(self._modes, dtype=np.int8).tobytes() if len(self._modes) else b"")
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        if commit:
            self.commit()

    def commit(self) -> None:
        """Rename the finished files into place (the `.bin` first, then the `.idx`)."""
        if self._state != "finalized" or self._idx_path is None or self._idx_tmp is None:
            raise IndexedDatasetError(f"{self.bin_path}: commit() needs finalize(idx_path, commit=False) first")
        # An old index next to a new .bin would look finished: remove it before the .bin moves.
        if os.path.lexists(self._idx_path):
            os.remove(self._idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self._idx_path)
        self._state = "committed"

    def abort(self) -> None:
        """Close and delete the temporary files; the builder cannot be used afterwards."""
        try:
            self._data.close()
        finally:
            for p in (self._bin_tmp, self._idx_tmp):
                if p and os.path.lexists(p):
                    os.remove(p)
            if self._state != "committed":
                self._state = "aborted"

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self._state != "committed":
            self.abort()

    def __del__(self) -> None:
        # A builder dropped without finalize leaves no temporary file behind.
        if getattr(self, "_state", None) in ("open", "finalized"):
            try:
                self.abort()
            except Exception:
                pass
