"""Encoding the chunks of a corpus (`corpus_reader`) into token arrays (`document_tokenizer`), in this process or in
a pool of worker processes, in input order.

`--workers 1` tokenizes in the main process, in chunks of ~1 MiB of text (the Rust tokenizer spreads a batch over its
own threads unless `TOKENIZERS_PARALLELISM=false`); with more, a `multiprocessing.Pool` tokenizes chunks of ~256 KiB
in order (`imap`), each worker single-threaded, with a bounded number of chunks in flight so memory stays flat on
large inputs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Tuple

from .corpus_reader import Chunk, chunk_columns
from .document_tokenizer import Encoded, TokenizeSettings, encode_documents

# Text per chunk: large in-process (the tokenizer's own threads split a batch), smaller for a pool
# so that the chunks spread evenly over the workers.
CHUNK_BYTES_IN_PROCESS = 1 << 20
CHUNK_BYTES_POOL = 256 * 1024


def default_chunk_bytes(workers: int) -> int:
    return CHUNK_BYTES_IN_PROCESS if workers == 1 else CHUNK_BYTES_POOL


@dataclass(frozen=True)
class ChunkJob:
    """What every worker needs besides the tokenizer: the keys to read, the input's name for messages, and the
    tokenize settings."""

    keys: Tuple[str, ...]
    description: str
    tokenize: TokenizeSettings


@dataclass
class EncodedChunk:
    records: int
    units: int
    per_key: Dict[str, Encoded]  # tokens, lengths, seqs/doc, empty docs


def encode_chunk(chunk: Chunk, tok: Any, job: ChunkJob) -> EncodedChunk:
    """One chunk -> the token arrays of each key."""
    cols, where, units = chunk_columns(chunk, job.keys, job.description)
    per_key = {key: encode_documents(cols[key], where, key, tok, job.tokenize, job.description) for key in job.keys}
    return EncodedChunk(records=len(where), units=units, per_key=per_key)


# A worker's job and tokenizer, set once per process by the pool's initializer (not sent with every chunk).
_STATE: Dict[str, Any] = {}


def _init_worker(job: ChunkJob, tokenizer: Any, single_threaded: bool) -> None:
    if single_threaded:
        # N worker processes on N cores: the Rust tokenizer's own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["job"] = job
    _STATE["tokenizer"] = tokenizer


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return encode_chunk(chunk, _STATE["tokenizer"], _STATE["job"])


class ChunkEncoder:
    """Chunks -> `EncodedChunk`s, in this process (`workers=1`) or in a pool that reads at most 4 chunks per worker
    ahead of the consumer (Pool.imap would otherwise read its whole input as fast as it can)."""

    def __init__(self, job: ChunkJob, tok: Any, workers: int) -> None:
        self.job, self.tok, self.workers = job, tok, workers
        self.pool = None
        self.stop = threading.Event()
        self.in_flight = threading.Semaphore(4 * workers)

    def encode(self, chunks: Iterator[Chunk]) -> Iterator[EncodedChunk]:
        if self.workers == 1:
            _init_worker(self.job, self.tok, single_threaded=False)
            return map(_encode_in_worker, chunks)
        self.pool = multiprocessing.Pool(self.workers, initializer=_init_worker,
                                         initargs=(self.job, self.tok, True))
        return self._taken(self.pool.imap(_encode_in_worker, self._throttled(chunks), chunksize=1))

    def _throttled(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for c in chunks:
            self.in_flight.acquire()
            if self.stop.is_set():
                return
            yield c

    def _taken(self, encoded: Iterator[EncodedChunk]) -> Iterator[EncodedChunk]:
        for enc in encoded:
            self.in_flight.release()  # the consumer has taken one encoded chunk: let the reader queue another
            yield enc

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


__all__ = ["CHUNK_BYTES_IN_PROCESS", "CHUNK_BYTES_POOL", "ChunkEncoder", "ChunkJob", "EncodedChunk",
           "default_chunk_bytes", "encode_chunk"]
