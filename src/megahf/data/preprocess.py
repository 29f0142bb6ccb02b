"""`megahf preprocess`: tokenize a corpus into Megatron's `.bin`/`.idx` indexed dataset.

The equivalent of Megatron-LM's `tools/preprocess_data.py`, for Hugging Face tokenizers::

    megahf preprocess --input corpus.jsonl --json-keys text --tokenizer gpt2 \\
        --output-prefix data/my --append-eod --workers 2
    python -m megahf.data.preprocess ...            # the same, without the CLI entry point

writes `data/my_text_document.bin` and `data/my_text_document.idx` (one pair per json key;
`_sentence` instead of `_document` with `--split-sentences`), readable by
`megahf.data.IndexedDataset` and by Megatron-Core's `IndexedDataset`.

Inputs (`--input`)
    * `.jsonl` / `.json`: one JSON object per line (blank lines are skipped); a `.json`
      file may instead hold one JSON array of objects. A key's value is a string, or a list of
      strings taken as the document's sentences (as Megatron does);
    * `.parquet`: the columns named by `--json-keys`;
    * `.txt`: one document per line (like `datasets`' text builder, without the trailing
      newline); blank lines are not documents; the only key is `text`;
    * a folder, or a Hugging Face dataset name (`--split`, `--subset`), through
      `datasets.load_dataset`: a Hub name works only when the dataset is in the local cache
      (megahf runs offline).

Tokenizer (`--tokenizer`)
    `gpt2` or `embedded` is the GPT-2 BPE tokenizer shipped with megahf; anything else goes to
    `transformers.AutoTokenizer.from_pretrained` (a local folder, or a cached Hub name). Text is
    encoded with `add_special_tokens=False`; `--append-eod` appends the tokenizer's eos id
    (its sep id when it has no eos, as BERT) to each document's last sequence. Tokens are stored
    as uint16 when the vocabulary (`len(tokenizer)`) is under 65,500 ids, else int32
    (Megatron's rule); `--dtype` overrides it.

Sentence splitting (`--split-sentences`)
    Megatron uses nltk's punkt model, which cannot be had offline. megahf uses
    `split_sentences`, a small documented rule set: a sentence ends after `.`, `!`,
    `?` or `…` (plus closing quotes or brackets) followed by whitespace and a word that does
    not start in lower case, unless the word before the period is a common abbreviation
    (`Mr.`, `Dr.`, `e.g.` ...) or an initial (`J.`); a blank line always ends a sentence.
    Whitespace between sentences is dropped, as punkt does without `--keep-newlines`. Each
    sentence becomes one sequence; a document is its sentences.

Differences from Megatron's tool, on purpose
    * documents that produce no tokens (empty text) are skipped and counted, instead of being
      written as empty documents;
    * bad input fails before anything is written when it can be seen up front (missing file or
      key, empty corpus, a vocabulary that does not fit the dtype, no eos for `--append-eod`),
      and otherwise removes every temporary file: outputs are written under hidden temporary names
      and renamed only when every key's pair is complete;
    * `--workers 1` tokenizes in the main process, in batches of ~1 MiB of text (the Rust
      tokenizer spreads a batch over its own threads unless `TOKENIZERS_PARALLELISM=false`);
      with more, a `multiprocessing.Pool` tokenizes chunks of ~256 KiB in order (`imap`),
      each worker single-threaded (`TOKENIZERS_PARALLELISM=false`), with a bounded number of
      chunks in flight so memory stays flat on large inputs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..assets import embedded_tokenizer_path
from ..errors import MegahfError, explain_write_errors, one_line
from .indexed_dataset import IndexedDatasetBuilder, best_dtype
from .preprocess_arguments import DTYPE_CHOICES, add_arguments

__all__ = [
    "EMBEDDED_TOKENIZER_NAMES",
    "PreprocessError",
    "PreprocessResult",
    "add_arguments",
    "load_tokenizer",
    "main",
    "output_prefix_for",
    "preprocess_corpus",
    "run",
    "split_sentences",
]

#: `--tokenizer` values that mean a tokenizer shipped in `megahf/assets` (GPT-2 BPE, BERT uncased WordPiece).
EMBEDDED_TOKENIZER_NAMES = ("gpt2", "embedded", "bert-uncased")
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
# Text per chunk: large in-process (the tokenizer's own threads split a batch), smaller for a pool
# so that the chunks spread evenly over the workers.
_CHUNK_BYTES_IN_PROCESS = 1 << 20
_CHUNK_BYTES_POOL = 256 * 1024
_DEFAULT_CHUNK_ROWS = 1024


class PreprocessError(MegahfError, ValueError):
    """Bad input to `megahf preprocess`; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------------------
# sentence splitting
# ---------------------------------------------------------------------------------------------
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs mt gen col lt sgt capt rev hon inc ltd co no fig vol ch pp e.g i.e cf al approx".split()
)
# A candidate end: terminal punctuation, optional closing quotes/brackets, whitespace; or a blank line.
_CANDIDATE = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\n[ \t\r\f\v]*\n\s*")
_OPENERS = "\"'\u201c\u2018([\u00bf\u00a1"


def split_sentences(text: str) -> List[str]:
    """Split `text` into sentences with the rules in this module's docstring (no nltk needed).

    >>> split_sentences("Mr. Smith came. He left! Did he? yes.\\n\\nNew paragraph")
    ['Mr. Smith came.', 'He left!', 'Did he? yes.', 'New paragraph']
    """
    sentences: List[str] = []
    start = 0
    for m in _CANDIDATE.finditer(text):
        cut = m.start()
        if text[m.start()] != "\n":  # punctuation, not a blank line
            after = m.end()
            while after < len(text) and text[after] in _OPENERS:
                after += 1
            if after < len(text) and text[after].islower():
                continue
            if text[m.start()] == ".":
                word = re.search(r"(\S+)$", text[start : m.start()])
                w = word.group(1).lstrip(_OPENERS).lower() if word else ""
                if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                    continue
            cut = m.end()
        piece = text[start:cut].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    piece = text[start:].strip()
    if piece:
        sentences.append(piece)
    return sentences


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str):
    """`gpt2`/`embedded` -> the shipped GPT-2 tokenizer, `bert-uncased` -> the shipped BERT WordPiece;
    else `AutoTokenizer.from_pretrained`."""
    path = embedded_tokenizer_path(name_or_path) or name_or_path
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, HFValidationError ...
        raise PreprocessError(
            f"could not load the tokenizer {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"give a local folder with the tokenizer files, a Hub name already in the local cache (megahf runs "
            f"offline), or one of the tokenizers shipped with megahf: {' / '.join(EMBEDDED_TOKENIZER_NAMES)}"
        ) from e


# ---------------------------------------------------------------------------------------------
# input sources: each yields chunks that a worker turns into token arrays
# ---------------------------------------------------------------------------------------------
# A chunk is (kind, first record number, payload, progress units):
#   ("json", first line number, [raw lines as bytes], bytes)      parsed in the worker
#   ("text", first line number, [raw lines as bytes], bytes)      decoded in the worker
#   ("columns", first row number, {key: [values]}, rows)
Chunk = Tuple[str, int, Any, int]


def _missing_key_message(key: str, where: str, keys_present: Sequence[str]) -> str:
    present = ", ".join(repr(k) for k in keys_present) or "none"
    return (
        f"{where}: no key {key!r} (keys present: {present}); pass the key(s) holding the text with "
        f"--json-keys"
    )


@dataclass
class _Source:
    description: str  # for messages: a path, or "dataset NAME (split S)"
    kind: str  # "json", "text", "parquet", "json-array", "hf"
    path: Optional[str] = None
    progress_total: Optional[int] = None
    progress_unit: str = "B"
    obj: Any = None  # the loaded records / dataset / ParquetFile

    def chunks(self, keys: Sequence[str], chunk_bytes: int, chunk_rows: int) -> Iterator[Chunk]:
        if self.kind in ("json", "text"):
            with open(self.path, "rb") as f:
                start, lines, size = 1, [], 0
                for lineno, line in enumerate(f, start=1):
                    if not lines:
                        start = lineno
                    lines.append(line)
                    size += len(line)
                    if size >= chunk_bytes or len(lines) >= 4 * chunk_rows:
                        yield (self.kind, start, lines, size)
                        lines, size = [], 0
                if lines:
                    yield (self.kind, start, lines, size)
        elif self.kind == "json-array":
            records = self.obj
            for s in range(0, len(records), chunk_rows):
                cols: Dict[str, list] = {k: [] for k in keys}
                for j, rec in enumerate(records[s : s + chunk_rows]):
                    where = f"{self.description}, record {s + j}"
                    if not isinstance(rec, dict):
                        raise PreprocessError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                    for k in keys:
                        if k not in rec:
                            raise PreprocessError(_missing_key_message(k, where, list(rec)))
                        cols[k].append(rec[k])
                yield ("columns", s, cols, len(cols[keys[0]]))
        elif self.kind == "parquet":
            row = 0
            for batch in self.obj.iter_batches(batch_size=chunk_rows, columns=list(keys)):
                cols = {k: batch.column(k).to_pylist() for k in keys}
                n = batch.num_rows
                yield ("columns", row, cols, n)
                row += n
        elif self.kind == "hf":
            row = 0
            for batch in self.obj.select_columns(list(keys)).iter(batch_size=chunk_rows):
                n = len(batch[keys[0]])
                yield ("columns", row, {k: batch[k] for k in keys}, n)
                row += n
        else:  # pragma: no cover
            raise AssertionError(self.kind)


def _first_nonblank_line(path: str) -> Tuple[int, Optional[bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                return lineno, line
    return 0, None


def _open_source(input: str, keys: Sequence[str], split: str, subset: Optional[str]) -> _Source:
    """Find what `input` is, and check (before anything is written) that it has the keys and data."""
    if os.path.isfile(input):
        lower = input.lower()
        size = os.path.getsize(input)
        if lower.endswith(_TEXT_SUFFIXES):
            if list(keys) != ["text"]:
                raise PreprocessError(
                    f"{input}: a .txt input has one text per line and only the key 'text'; "
                    f"drop --json-keys {' '.join(keys)} (or convert the file to .jsonl)"
                )
            if _first_nonblank_line(input)[1] is None:
                raise PreprocessError(f"{input}: empty corpus: the file has no non-blank line")
            return _Source(input, "text", path=input, progress_total=size)
        if lower.endswith(_JSON_SUFFIXES):
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
                src = _Source(input, "json-array", path=input, progress_total=len(records), progress_unit="doc", obj=records)
            else:
                where = f"{input}, line {lineno}"
                try:
                    first = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise PreprocessError(f"{where}: not valid JSON ({e}); the input must hold one JSON object per line") from e
                src = _Source(input, "json", path=input, progress_total=size)
            if not isinstance(first, dict):
                raise PreprocessError(f"{where}: expected a JSON object, got {type(first).__name__}")
            for k in keys:
                if k not in first:
                    raise PreprocessError(_missing_key_message(k, where, list(first)))
            return src
        if lower.endswith(_PARQUET_SUFFIXES):
            try:
                pf = pq.ParquetFile(input)
            except Exception as e:
                raise PreprocessError(f"{input}: cannot read as parquet ({e})") from e
            names = pf.schema_arrow.names
            for k in keys:
                if k not in names:
                    raise PreprocessError(_missing_key_message(k, input, names))
            if pf.metadata.num_rows == 0:
                raise PreprocessError(f"{input}: empty corpus: the parquet file has no rows")
            return _Source(input, "parquet", path=input, progress_total=pf.metadata.num_rows, progress_unit="doc", obj=pf)
        raise PreprocessError(
            f"{input}: unsupported file type; use .jsonl, .json, .parquet or .txt "
            f"(or a folder / Hugging Face dataset name that datasets.load_dataset can read)"
        )

    looks_like_path = input.startswith((".", "/", "~")) or input.lower().endswith(
        _TEXT_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
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
            raise PreprocessError(_missing_key_message(k, desc, ds.column_names))
    total = len(ds) if hasattr(ds, "__len__") else None
    if total == 0:
        raise PreprocessError(f"{desc}: empty corpus: the split has no rows")
    return _Source(desc, "hf", progress_total=total, progress_unit="doc", obj=ds)


# ---------------------------------------------------------------------------------------------
# encoding (runs in the workers, or in the main process with --workers 1)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    keys: Tuple[str, ...]
    description: str
    append_eod: bool
    eod_id: Optional[int]
    split_sentences: bool
    dtype: str


_STATE: Dict[str, Any] = {}


def _init_worker(settings: _Settings, tokenizer: Any, single_threaded: bool) -> None:
    if single_threaded:
        # N worker processes on N cores: the Rust tokenizer's own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["settings"] = settings
    _STATE["tokenizer"] = tokenizer


def _columns_of(chunk: Chunk, st: _Settings) -> Tuple[Dict[str, list], List[str], int]:
    """The chunk as {key: [value per record]} with a location per record, and its progress units."""
    kind, start, payload, units = chunk
    if kind == "columns":
        n = len(payload[st.keys[0]])
        return payload, [f"{st.description}, record {start + j}" for j in range(n)], units
    cols: Dict[str, list] = {k: [] for k in st.keys}
    where: List[str] = []
    for j, raw in enumerate(payload):
        if not raw.strip():
            continue
        loc = f"{st.description}, line {start + j}"
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
            for k in st.keys:
                if k not in rec:
                    raise PreprocessError(_missing_key_message(k, loc, list(rec)))
                cols[k].append(rec[k])
        where.append(loc)
    return cols, where, units


def _pieces(value: Any, key: str, loc: str, split: bool) -> List[str]:
    """The texts to tokenize for one document: the whole text, its sentences, or a given list."""
    if isinstance(value, str):
        return split_sentences(value) if split else [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PreprocessError(
        f"{loc}: the value of {key!r} is {type(value).__name__ if value is not None else 'null'}, "
        f"expected a string (or a list of strings, taken as sentences)"
    )


@dataclass
class _Encoded:
    records: int
    units: int
    per_key: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, int]]  # tokens, lengths, seqs/doc, empty docs


def _encode_chunk(chunk: Chunk) -> _Encoded:
    st: _Settings = _STATE["settings"]
    tok = _STATE["tokenizer"]
    dtype = np.dtype(st.dtype)
    cols, where, units = _columns_of(chunk, st)
    n_docs = len(where)
    out: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
    for key in st.keys:
        texts: List[str] = []
        per_doc_pieces = np.zeros(n_docs, dtype=np.int64)
        for d, (value, loc) in enumerate(zip(cols[key], where)):
            pieces = _pieces(value, key, loc, st.split_sentences)
            texts.extend(pieces)
            per_doc_pieces[d] = len(pieces)
        ids = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] if texts else []
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
        # Sequences with no tokens are dropped (as Megatron does); documents left with none are skipped.
        keep = lens > 0
        doc_of_piece = np.repeat(np.arange(n_docs), per_doc_pieces)
        lens = lens[keep]
        seqs_per_doc = np.bincount(doc_of_piece[keep], minlength=n_docs)
        nonempty = seqs_per_doc > 0
        if st.append_eod and lens.size:
            last = np.cumsum(seqs_per_doc)[nonempty] - 1  # each document's last sequence
            flat = np.insert(flat, np.cumsum(lens)[last], st.eod_id)
            lens[last] += 1
        if flat.size and dtype.kind in "iu":
            hi, lo = int(flat.max()), int(flat.min())
            info = np.iinfo(dtype)
            if hi > info.max or lo < info.min:
                bad = hi if hi > info.max else lo
                raise PreprocessError(
                    f"{st.description}: token id {bad} (key {key!r}) does not fit dtype {dtype} "
                    f"(range {info.min}..{info.max}); rerun with --dtype int32"
                )
        out[key] = (
            flat.astype(dtype),
            lens.astype(np.int32),
            seqs_per_doc[nonempty].astype(np.int64),
            int(n_docs - int(nonempty.sum())),
        )
    return _Encoded(records=n_docs, units=units, per_key=out)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def output_prefix_for(output_prefix: str, key: str, split_sentences: bool = False) -> str:
    """`{output_prefix}_{key}_document` (`_sentence` with sentence splitting), as Megatron names it."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


@dataclass
class PreprocessResult:
    """What `preprocess_corpus` wrote. Per key: `documents`, `sequences`, `tokens`, `bytes`."""

    prefixes: Dict[str, str]
    records: int  # input records (documents) read
    documents: Dict[str, int] = field(default_factory=dict)
    sequences: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    skipped_empty: Dict[str, int] = field(default_factory=dict)
    bytes: Dict[str, int] = field(default_factory=dict)
    dtype: str = ""
    workers: int = 1
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        docs = sum(self.documents.values())
        mb = sum(self.bytes.values()) / 1e6
        skipped = sum(self.skipped_empty.values())
        where = ", ".join(f"{p}.{{bin,idx}}" for p in self.prefixes.values())
        return (
            f"preprocess: {docs:,} documents, {self.total_tokens:,} tokens, {mb:.2f} MB ({self.dtype}) "
            f"in {self.seconds:.2f} s, {self.tokens_per_second:,.0f} tokens/s, {self.workers} worker(s)"
            + (f", {skipped:,} empty documents skipped" if skipped else "")
            + f" -> {where}"
        )


def _eod_id(tok: Any, name: str) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    raise PreprocessError(
        f"--append-eod: the tokenizer {name!r} has neither an eos nor a sep token; drop --append-eod "
        f"or use a tokenizer that defines one"
    )


def _resolve_dtype(dtype: Optional[str], vocab: int, name: str) -> np.dtype:
    if dtype in (None, "auto"):
        return best_dtype(vocab)
    if dtype not in DTYPE_CHOICES:
        raise PreprocessError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    dt = np.dtype(dtype)
    if vocab - 1 > np.iinfo(dt).max:
        raise PreprocessError(
            f"the tokenizer {name!r} has {vocab:,} ids (0..{vocab - 1:,}), which do not fit --dtype {dt} "
            f"(at most {np.iinfo(dt).max:,}); use --dtype auto ({best_dtype(vocab)}) or a wider dtype"
        )
    return dt


def preprocess_corpus(
    input: str,
    output_prefix: str,
    tokenizer: str = "gpt2",
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    split_sentences: bool = False,
    workers: int = 1,
    dtype: Optional[str] = "auto",
    split: str = "train",
    subset: Optional[str] = None,
    log_interval: int = 0,
    progress: Optional[bool] = None,
    chunk_bytes: Optional[int] = None,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
) -> PreprocessResult:
    """Tokenize `input` into `{output_prefix}_{key}_{document|sentence}.bin/.idx` per key.

    See the module docstring for inputs, tokenizers and sentence splitting. `progress`: show a
    tqdm bar (`None`: only on a terminal). `log_interval`: also print a line every that many
    documents (0: never). Raises `PreprocessError` (or `FileNotFoundError`) on bad input;
    on any error no output or temporary file is left behind.
    """
    t0 = time.perf_counter()
    keys = tuple(dict.fromkeys(json_keys))
    _check_arguments(keys, workers, output_prefix)
    source = _open_source(input, keys, split, subset)
    tok = load_tokenizer(tokenizer)
    dt = _resolve_dtype(dtype, len(tok), tokenizer)
    eod = _eod_id(tok, tokenizer) if append_eod else None
    settings = _Settings(keys, source.description, append_eod, eod, split_sentences, dt.name)
    prefixes = {k: output_prefix_for(output_prefix, k, split_sentences) for k in keys}
    result = PreprocessResult(prefixes=prefixes, records=0, dtype=dt.name, workers=workers)
    for k in keys:
        result.documents[k] = result.sequences[k] = result.tokens[k] = result.skipped_empty[k] = 0

    builders: Dict[str, IndexedDatasetBuilder] = {}
    encoder = _ChunkEncoder(settings, tok, workers)
    outputs = " and ".join(f"{p}.bin/.idx" for p in prefixes.values())
    with explain_write_errors(  # a full disk or an unwritable folder: one clear error, after the cleanup below
        outputs,
        intact=f"nothing was published and the temporary files are removed: any previous {outputs} are intact",
        elsewhere="give an --output-prefix on another disk or folder",
    ):
        made_dirs = _make_output_folder(output_prefix)
        try:
            for k in keys:
                builders[k] = IndexedDatasetBuilder(prefixes[k] + ".bin", dtype=dt)
            if chunk_bytes is None:
                chunk_bytes = _CHUNK_BYTES_IN_PROCESS if workers == 1 else _CHUNK_BYTES_POOL
            encoded = encoder.encode(source.chunks(keys, chunk_bytes, chunk_rows))
            with tqdm(total=source.progress_total, unit=source.progress_unit, unit_scale=True, desc="preprocess",
                      disable=(None if progress is None else not progress), dynamic_ncols=True) as bar:
                _add_encoded(encoded, encoder, builders, result, bar, log_interval)
            _publish(builders, prefixes, result, source.description)
        except BaseException:
            encoder.abort()
            for b in builders.values():
                b.abort()
            _remove_folders(made_dirs)
            raise
        finally:
            encoder.close()
    result.seconds = time.perf_counter() - t0
    return result


def _check_arguments(keys: Sequence[str], workers: int, output_prefix: str) -> None:
    if not keys:
        raise PreprocessError("--json-keys: give at least one key")
    if workers < 1:
        raise PreprocessError(f"--workers {workers}: need at least 1")
    if not output_prefix or output_prefix.endswith(("/", os.sep)):
        raise PreprocessError(f"--output-prefix {output_prefix!r}: give a file prefix such as data/my, not a folder")


def _make_output_folder(output_prefix: str) -> List[str]:
    """Create the output folder; return the folders this created, outermost first (removed again on error)."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    made_dirs: List[str] = []
    d = out_dir
    while not os.path.isdir(d):
        made_dirs.insert(0, d)
        d = os.path.dirname(d)
    os.makedirs(out_dir, exist_ok=True)
    return made_dirs


def _remove_folders(made_dirs: List[str]) -> None:
    for d in reversed(made_dirs):
        try:
            os.rmdir(d)  # only if still empty
        except OSError:
            break


class _ChunkEncoder:
    """Chunks -> `_Encoded`, in this process (`workers=1`) or in a pool that reads at most 4 chunks per worker
    ahead of the writer (Pool.imap would otherwise read its whole input as fast as it can)."""

    def __init__(self, settings: _Settings, tok: Any, workers: int) -> None:
        self.settings, self.tok, self.workers = settings, tok, workers
        self.pool = None
        self.stop = threading.Event()
        self.in_flight = threading.Semaphore(4 * workers)

    def encode(self, chunks: Iterator[Chunk]) -> Iterator[_Encoded]:
        if self.workers == 1:
            _init_worker(self.settings, self.tok, single_threaded=False)
            return map(_encode_chunk, chunks)
        self.pool = multiprocessing.Pool(self.workers, initializer=_init_worker,
                                         initargs=(self.settings, self.tok, True))
        return self.pool.imap(_encode_chunk, self._throttled(chunks), chunksize=1)

    def _throttled(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for c in chunks:
            self.in_flight.acquire()
            if self.stop.is_set():
                return
            yield c

    def done_one(self) -> None:
        """The writer has taken one encoded chunk: let the reader queue another."""
        if self.pool is not None:
            self.in_flight.release()

    def abort(self) -> None:
        self.stop.set()
        self.in_flight.release(8 * self.workers + 8)
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None
        _STATE.clear()


def _add_encoded(encoded: Iterator[_Encoded], encoder: _ChunkEncoder, builders: Dict[str, IndexedDatasetBuilder],
                 result: PreprocessResult, bar: Any, log_interval: int) -> None:
    """Append every encoded chunk to the builders and count it; a log line every `log_interval` documents."""
    next_log = log_interval if log_interval > 0 else None
    t_proc = time.perf_counter()
    for enc in encoded:
        encoder.done_one()
        result.records += enc.records
        for k, (tokens, lengths, seqs_per_doc, empty) in enc.per_key.items():
            if lengths.size:
                builders[k].add_documents(tokens, lengths, seqs_per_doc)
            result.documents[k] += int(seqs_per_doc.size)
            result.sequences[k] += int(lengths.size)
            result.tokens[k] += int(tokens.size)
            result.skipped_empty[k] += empty
        bar.update(enc.units)
        if next_log is not None and result.records >= next_log:
            el = time.perf_counter() - t_proc
            bar.write(
                f"processed {result.records:,} documents ({result.records / el:,.0f} docs/s, "
                f"{result.total_tokens / el:,.0f} tokens/s)",
                file=sys.stderr,
            )
            while next_log <= result.records:
                next_log += log_interval


def _publish(builders: Dict[str, IndexedDatasetBuilder], prefixes: Dict[str, str], result: PreprocessResult,
             description: str) -> None:
    """Refuse a key without tokens; then publish only when every key's pair is complete: write all indexes, then
    rename."""
    for k in builders:
        if result.tokens[k] == 0:
            raise PreprocessError(
                f"{description}: empty corpus: the {result.records:,} documents of key {k!r} "
                f"produce no tokens (all texts are empty)"
            )
    for k, builder in builders.items():
        builder.finalize(prefixes[k] + ".idx", commit=False)
    for k, builder in builders.items():
        builder.commit()
        result.bytes[k] = os.path.getsize(prefixes[k] + ".bin")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run `megahf preprocess` with parsed arguments; returns the exit status."""
    try:
        result = preprocess_corpus(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            workers=args.workers,
            dtype=args.dtype,
            split=args.split,
            subset=args.subset,
            log_interval=args.log_interval,
            progress=False if getattr(args, "no_progress", False) else None,
        )
    except (MegahfError, FileNotFoundError) as e:
        print(f"megahf preprocess: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megahf preprocess")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
