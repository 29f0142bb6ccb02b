"""Reading the inputs of `megahf preprocess`: what a file, folder or dataset name is, checked before anything is
written (`open_corpus`), and its records in chunks (`CorpusSource.chunks`) or one by one (`read_documents`).

Inputs: `.jsonl` / `.json` (one JSON object per line, blank lines skipped; a `.json` file may instead hold one JSON
array of objects), `.parquet` (the columns named by the keys), `.txt` (one document per line, without its newline;
blank lines are not documents; the only key is `text`), or a folder / Hugging Face dataset name through
`datasets.load_dataset` (offline: a Hub name works only when the dataset is in the local cache).

A chunk is `(kind, first record number, payload, progress units)`:
    ("json", first line number, [raw lines as bytes], bytes)      parsed where it is tokenized (a worker)
    ("text", first line number, [raw lines as bytes], bytes)      decoded where it is tokenized
    ("columns", first row number, {key: [values]}, rows)
so that a pool's workers, not the reading process, spend the time parsing JSON; `chunk_columns` turns any chunk into
columns with one location per record ("c.jsonl, line 3") for the messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import pyarrow.parquet as pq

from .preprocess_errors import PreprocessError, missing_key_message

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
#: Records per chunk of a columnar input (and at most 4x as many lines per chunk of a line input).
DEFAULT_CHUNK_ROWS = 1024
#: Text per chunk when the documents are read one by one (`read_documents`): the chunking is not seen.
_READ_CHUNK_BYTES = 1 << 20

Chunk = Tuple[str, int, Any, int]
#: One document: where it was read (for messages: "c.jsonl, line 3") and its value per key.
Document = Tuple[str, Dict[str, Any]]


@dataclass
class CorpusSource:
    """An input `open_corpus` has checked: what it is, where it is, and how much of it there is (for progress)."""

    description: str  # for messages: a path, or "dataset NAME (split S)"
    kind: str  # "json", "text", "parquet", "json-array", "hf"
    path: Optional[str] = None
    progress_total: Optional[int] = None
    progress_unit: str = "B"
    obj: Any = None  # the loaded records / dataset / ParquetFile

    def chunks(self, keys: Sequence[str], chunk_bytes: int, chunk_rows: int,
               start: int = 0, end: Optional[int] = None) -> Iterator[Chunk]:
        """The input in chunks of about `chunk_bytes` of text (line inputs) or `chunk_rows` records (the others).
        `start`/`end`: only that part of the input, counted in its `progress_unit`: the lines that begin in that byte
        range of a .jsonl/.txt file (see `line_chunks`), else the records `start` to `end - 1`."""
        if self.kind in ("json", "text"):
            yield from line_chunks(self.path, self.kind, chunk_bytes, chunk_rows, start, end)
            return
        stop = self.progress_total if end is None else min(end, self.progress_total)
        if self.kind == "json-array":
            records = self.obj
            for s in range(start, stop, chunk_rows):
                cols: Dict[str, list] = {k: [] for k in keys}
                for j, rec in enumerate(records[s : min(s + chunk_rows, stop)]):
                    where = f"{self.description}, record {s + j}"
                    if not isinstance(rec, dict):
                        raise PreprocessError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                    for k in keys:
                        if k not in rec:
                            raise PreprocessError(missing_key_message(k, where, list(rec)))
                        cols[k].append(rec[k])
                yield ("columns", s, cols, len(cols[keys[0]]))
        elif self.kind == "parquet":
            yield from _parquet_chunks(self.obj, keys, chunk_rows, start, stop)
        elif self.kind == "hf":
            ds = self.obj if (start, stop) == (0, self.progress_total) else self.obj.select(range(start, stop))
            row = start
            for batch in ds.select_columns(list(keys)).iter(batch_size=chunk_rows):
                n = len(batch[keys[0]])
                yield ("columns", row, {k: batch[k] for k in keys}, n)
                row += n
        else:  # pragma: no cover
            raise AssertionError(self.kind)

    def shard(self, rank: int, world_size: int) -> Tuple[int, Optional[int]]:
        """The `(start, end)` of part `rank` of `world_size` contiguous parts of about equal size (bytes of a line
        input, records of the others), for `chunks`: the parts tile the input, in order."""
        total = self.progress_total
        return total * rank // world_size, (None if rank == world_size - 1 else total * (rank + 1) // world_size)


def _parquet_chunks(pf: Any, keys: Sequence[str], chunk_rows: int, start: int, stop: int) -> Iterator[Chunk]:
    """Rows `start` to `stop - 1` of a parquet file, reading only the row groups that hold them."""
    groups, row = [], 0  # the row groups that overlap the range; `first`: the row the first of them begins at
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < stop:
            if not groups:
                first = row
            groups.append(g)
        row += n
    if not groups:
        return
    row = first
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=list(keys), row_groups=groups):
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        if hi > lo:
            yield ("columns", row + lo, {k: batch.column(k).to_pylist()[lo:hi] for k in keys}, hi - lo)
        row += batch.num_rows
        if row >= stop:
            return


def line_chunks(path: str, kind: str, chunk_bytes: int, chunk_rows: int,
                start: int = 0, end: Optional[int] = None) -> Iterator[Chunk]:
    """Chunks of the raw lines of a .jsonl/.txt file. With a byte range, a line belongs to the range its first byte
    lies in, so ranges that tile the file read every line exactly once; line numbers then count from the range's
    first whole line."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that straddles `start` belongs to the range before
        position = f.tell()
        first, lines, size = 1, [], 0
        for lineno, line in enumerate(f, start=1):
            if end is not None and position >= end:
                break
            position += len(line)
            if not lines:
                first = lineno
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes or len(lines) >= 4 * chunk_rows:
                yield (kind, first, lines, size)
                lines, size = [], 0
        if lines:
            yield (kind, first, lines, size)


def _first_nonblank_line(path: str) -> Tuple[int, Optional[bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                return lineno, line
    return 0, None


def open_corpus(input: str, keys: Sequence[str], split: str = "train", subset: Optional[str] = None) -> CorpusSource:
    """Find what `input` is, and check (before anything is written) that it has the keys and data."""
    if os.path.isfile(input):
        lower = input.lower()
        size = os.path.getsize(input)
        if lower.endswith(TEXT_SUFFIXES):
            if list(keys) != ["text"]:
                raise PreprocessError(
                    f"{input}: a .txt input has one text per line and only the key 'text'; "
                    f"drop --json-keys {' '.join(keys)} (or convert the file to .jsonl)"
                )
            if _first_nonblank_line(input)[1] is None:
                raise PreprocessError(f"{input}: empty corpus: the file has no non-blank line")
            return CorpusSource(input, "text", path=input, progress_total=size)
        if lower.endswith(JSON_SUFFIXES):
            lineno, line = _first_nonblank_line(input)
            if line is None:
                raise PreprocessError(f"{input}: empty corpus: the file has no non-blank line")
            if lower.endswith(".json") and line.lstrip().startswith(b"["):
                try:
                    with open(input, "rb") as f:
                        records = json.load(f)
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{input}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})") from e
                if not isinstance(records, list) or not records:
                    raise PreprocessError(f"{input}: empty corpus: the JSON array has no records")
                first = records[0]
                where = f"{input}, record 0"
                src = CorpusSource(input, "json-array", path=input, progress_total=len(records), progress_unit="doc",
                                   obj=records)
            else:
                where = f"{input}, line {lineno}"
                try:
                    first = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise PreprocessError(f"{where}: not valid JSON ({e}); the input must hold one JSON object per line") from e
                src = CorpusSource(input, "json", path=input, progress_total=size)
            if not isinstance(first, dict):
                raise PreprocessError(f"{where}: expected a JSON object, got {type(first).__name__}")
            for k in keys:
                if k not in first:
                    raise PreprocessError(missing_key_message(k, where, list(first)))
            return src
        if lower.endswith(PARQUET_SUFFIXES):
            try:
                pf = pq.ParquetFile(input)
            except Exception as e:
                raise PreprocessError(f"{input}: cannot read as parquet ({e})") from e
            names = pf.schema_arrow.names
            for k in keys:
                if k not in names:
                    raise PreprocessError(missing_key_message(k, input, names))
            if pf.metadata.num_rows == 0:
                raise PreprocessError(f"{input}: empty corpus: the parquet file has no rows")
            return CorpusSource(input, "parquet", path=input, progress_total=pf.metadata.num_rows, progress_unit="doc",
                                obj=pf)
        raise PreprocessError(
            f"{input}: unsupported file type; use .jsonl, .json, .parquet or .txt "
            f"(or a folder / Hugging Face dataset name that datasets.load_dataset can read)"
        )

    looks_like_path = input.startswith((".", "/", "~")) or input.lower().endswith(
        TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    )
    if not os.path.isdir(input) and looks_like_path:
        raise PreprocessError(f"input file {input!r} does not exist")

    desc = f"dataset {input!r}" + (f" (subset {subset!r})" if subset else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(input, subset, split=split)
    except Exception as e:
        raise PreprocessError(
            f"could not load {desc} with datasets.load_dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). megahf runs offline: a Hub dataset must already be in "
            f"the local cache; otherwise give a local .jsonl, .json, .parquet or .txt file"
        ) from e
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split=... returns a Dataset
        raise PreprocessError(f"{desc}: pick one split with --split (have: {', '.join(ds)})")
    for k in keys:
        if k not in ds.column_names:
            raise PreprocessError(missing_key_message(k, desc, ds.column_names))
    total = len(ds) if hasattr(ds, "__len__") else None
    if total == 0:
        raise PreprocessError(f"{desc}: empty corpus: the split has no rows")
    return CorpusSource(desc, "hf", progress_total=total, progress_unit="doc", obj=ds)


def input_state(input: str) -> Any:
    """What identifies the input's content cheaply: the size and modification time of the file, or of every file of
    a folder; None for a dataset name (the cache decides)."""
    if os.path.isfile(input):
        st = os.stat(input)
        return [st.st_size, st.st_mtime_ns]
    if os.path.isdir(input):
        files = []
        for root, dirs, names in os.walk(input):
            dirs.sort()
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                files.append([os.path.relpath(os.path.join(root, name), input), st.st_size, st.st_mtime_ns])
        return files
    return None


def chunk_columns(chunk: Chunk, keys: Sequence[str], description: str) -> Tuple[Dict[str, list], List[str], int]:
    """The chunk as {key: [value per record]} with a location per record, and its progress units. Raw lines are
    decoded (and parsed as JSON) here; blank lines are no records."""
    kind, start, payload, units = chunk
    if kind == "columns":
        n = len(payload[keys[0]])
        return payload, [f"{description}, record {start + j}" for j in range(n)], units
    cols: Dict[str, list] = {k: [] for k in keys}
    where: List[str] = []
    for j, raw in enumerate(payload):
        if not raw.strip():
            continue
        loc = f"{description}, line {start + j}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PreprocessError(f"{loc}: not UTF-8 ({e})") from None
        if kind == "text":
            cols["text"].append(line.rstrip("\r\n"))
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{loc}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise PreprocessError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
            for k in keys:
                if k not in rec:
                    raise PreprocessError(missing_key_message(k, loc, list(rec)))
                cols[k].append(rec[k])
        where.append(loc)
    return cols, where, units


def read_documents(input: str, keys: Sequence[str] = ("text",), start: int = 0, end: Optional[int] = None,
                   split: str = "train", subset: Optional[str] = None) -> Iterator[Document]:
    """The documents of `input` (anything `megahf preprocess` reads), checked as it checks them, one at a time as
    `(location, {key: value})`. `start`/`end` read only part of it (`CorpusSource.chunks`): the lines that begin in
    that byte range of a .jsonl or .txt file (ranges that tile the file read each line once; locations then say
    "from byte START"), else the records `start` to `end - 1`."""
    keys = tuple(dict.fromkeys(keys))
    source = open_corpus(input, keys, split, subset)
    from_byte = start and source.kind in ("json", "text")
    description = f"{source.description} from byte {start}" if from_byte else source.description
    for chunk in source.chunks(keys, _READ_CHUNK_BYTES, DEFAULT_CHUNK_ROWS, start, end):
        cols, where, _ = chunk_columns(chunk, keys, description)
        for j, location in enumerate(where):
            yield location, {k: cols[k][j] for k in keys}


__all__ = ["DEFAULT_CHUNK_ROWS", "Chunk", "CorpusSource", "Document", "chunk_columns", "input_state", "line_chunks",
           "open_corpus",
           "read_documents"]
