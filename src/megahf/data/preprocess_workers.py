"""Encoding the chunks of a corpus (`corpus_reader`) into token arrays (`document_tokenizer`), in this process or in
a pool of worker processes, in input order.

`--workers 1` tokenizes in the main process, in chunks of ~1 MiB of text (the Rust tokenizer spreads a batch over its
own threads unless `TOKENIZERS_PARALLELISM=false`); with more, a `ProcessPoolExecutor` tokenizes chunks of ~256 KiB,
each worker single-threaded, at most 4 chunks per worker in flight (memory stays flat on large inputs), taken back
in input order.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

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


def limit_tokenizer_threads(threads: Optional[int]) -> None:
    """Give the Rust tokenizer of this process `threads` threads (None: leave it its own choice, every core), before
    it first spreads a batch over them: processes sharing the cores would oversubscribe them with a pool each."""
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    elif threads:
        os.environ["RAYON_NUM_THREADS"] = str(threads)


def _init_worker(job: ChunkJob, tokenizer: Any, single_threaded: bool) -> None:
    limit_tokenizer_threads(1 if single_threaded else None)  # N worker processes on N cores: one thread each
    _STATE["job"] = job
    _STATE["tokenizer"] = tokenizer


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return encode_chunk(chunk, _STATE["tokenizer"], _STATE["job"])


class ChunkEncoder:
    """Chunks -> `EncodedChunk`s, in this process (`workers=1`) or in a process pool, in input order.

    The pool gets at most 4 chunks per worker ahead of the consumer, submitted from the consumer's own thread. An
    aborted run never kills a worker: each finishes the chunks already handed to it and exits, so no thread is left
    writing to a pipe that nobody reads (which made `multiprocessing.Pool.terminate` hang, rarely)."""

    def __init__(self, job: ChunkJob, tok: Any, workers: int) -> None:
        self.job, self.tok, self.workers = job, tok, workers
        self.pool = None

    def encode(self, chunks: Iterator[Chunk]) -> Iterator[EncodedChunk]:
        if self.workers == 1:
            _init_worker(self.job, self.tok, single_threaded=False)
            return map(_encode_in_worker, chunks)
        self.pool = ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(self.job, self.tok, True))
        return self._in_order(chunks, self.pool)

    def _in_order(self, chunks: Iterator[Chunk], pool: ProcessPoolExecutor) -> Iterator[EncodedChunk]:
        window: collections.deque[Future] = collections.deque()
        for chunk in chunks:
            window.append(pool.submit(_encode_in_worker, chunk))
            if len(window) >= 4 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def abort(self) -> None:
        """Drop the chunks not started; the workers finish the ones they hold (a fraction of a second) and exit."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        _STATE.clear()


__all__ = ["CHUNK_BYTES_IN_PROCESS", "CHUNK_BYTES_POOL", "ChunkEncoder", "ChunkJob", "EncodedChunk",
           "default_chunk_bytes", "encode_chunk", "limit_tokenizer_threads"]
