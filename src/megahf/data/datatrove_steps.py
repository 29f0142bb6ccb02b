"""`megahf preprocess` as two datatrove pipeline steps, so that any datatrove executor (local, Slurm, Ray) runs it and
the output is the same bytes whatever runs it:

* `TokenizeShard`: task `rank` of `tasks` reads its contiguous part of the input (`CorpusSource.shard`: a byte range
  snapped to line starts for a .jsonl/.txt file, a range of records otherwise), tokenizes it with megahf's
  tokenizer code (`encode_chunk`: sentence splitting, end-of-document token, empty documents skipped) and writes one
  `.bin`/`.idx` pair per key into `{work_dir}/parts/`, published by rename only once complete, with its counts beside it;
* `MergeShards` (one task, run after every `TokenizeShard` task): appends the parts in rank order, that is in input
  order, into the final `{output_prefix}_{key}_{document|sentence}.bin/.idx` (written under temporary names, renamed
  once all keys are complete, exactly as the single-machine path publishes), records `merged.json`, and removes the
  parts.

Importing this module needs datatrove (`pip install megahf[distributed]`); `preprocess_datatrove` builds the executors.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from ..atomic import atomic_write_json
from .corpus_reader import DEFAULT_CHUNK_ROWS, input_state, open_corpus
from .document_tokenizer import TokenizeSettings, load_tokenizer
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from .preprocess_errors import PreprocessError
from .preprocess_output import PreprocessResult, output_prefix_for, publish
from .preprocess_workers import CHUNK_BYTES_IN_PROCESS, ChunkJob, encode_chunk, limit_tokenizer_threads
from .tokenizer_record import tokenizer_identity

#: The counts each task writes beside its parts and the merge adds up (a `PreprocessResult` per key, and records).
COUNTS = ("documents", "sequences", "tokens", "skipped_empty")

#: The tokenizer `preprocess_datatrove` loaded to plan the job, by the name the job gives it. The local executor forks
#: its tasks from that process and runs the merge in it: they take this one instead of loading it again (a few tenths
#: of a second each, the merge's on the critical path). A fresh process (Slurm, Ray) finds nothing here and loads it.
_PLANNED_TOKENIZER: Dict[str, Any] = {}


def plan_tokenizer(name: Optional[str], tokenizer: Any = None) -> None:
    """Hand the tasks started from this process the tokenizer loaded as `name`; `plan_tokenizer(None)` forgets it."""
    _PLANNED_TOKENIZER.clear()
    if name is not None:
        _PLANNED_TOKENIZER[name] = tokenizer


def job_tokenizer(name: str) -> Any:
    """The planning process's tokenizer when this task runs in (or was forked from) it, else a fresh load."""
    tok = _PLANNED_TOKENIZER.get(name)
    return load_tokenizer(name) if tok is None else tok


@dataclass(frozen=True)
class PreprocessJob:
    """What every task needs (small and picklable: executors pickle the steps that hold it)."""

    input: str
    split: str
    subset: Optional[str]
    keys: Tuple[str, ...]
    tokenizer: str
    settings: TokenizeSettings
    output_prefix: str
    work_dir: str
    tasks: int
    input_state: Any = None  # `corpus_reader.input_state` when the job was planned: each task checks it
    log_interval: int = 0
    threads: Optional[int] = None  # the Rust tokenizer's threads per task; None: all it sees

    def part_prefix(self, key: str, rank: int) -> str:
        return os.path.join(self.work_dir, "parts", f"{key}_{rank:05d}")

    def counts_path(self, rank: int) -> str:
        return os.path.join(self.work_dir, "parts", f"counts_{rank:05d}.json")

    @property
    def merged_path(self) -> str:
        return os.path.join(self.work_dir, "merged.json")

    @property
    def prefixes(self) -> Dict[str, str]:
        return {k: output_prefix_for(self.output_prefix, k, self.settings.split_sentences) for k in self.keys}

    def finished(self) -> bool:
        """Whether the merge recorded its end and every final pair is there."""
        return os.path.isfile(self.merged_path) and all(
            IndexedDataset.exists(p) for p in self.prefixes.values())

    def as_dict(self) -> dict:
        return asdict(self)


def _remove_stale_temporaries(job: PreprocessJob, rank: int) -> None:
    """The hidden temporary files a killed run of this task left (a builder removes its own unless the process is
    killed): `.{name}.*` for each of the task's files."""
    folder = os.path.join(job.work_dir, "parts")
    for name in [f"{key}_{rank:05d}" for key in job.keys] + [f"counts_{rank:05d}"]:
        for path in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*")):
            os.remove(path)


class TokenizeShard(PipelineStep):
    """Task `rank` of `job.tasks`: its part of the input -> one `.bin`/`.idx` pair per key in `{work_dir}/parts/`."""

    name = "megahf tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, job: PreprocessJob) -> None:
        super().__init__()
        self.job = job

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        job = self.job
        if world_size != job.tasks:
            raise PreprocessError(f"the executor runs {world_size} tasks but the job was planned for {job.tasks}")
        if input_state(job.input) != job.input_state:  # the parts of one job must cut the same input
            raise PreprocessError(
                f"{job.input}: changed since the job was planned (size or modification time); the parts of the "
                f"finished tasks no longer fit it: remove {job.work_dir} and run the command again")
        os.makedirs(os.path.dirname(job.part_prefix(job.keys[0], rank)), exist_ok=True)
        _remove_stale_temporaries(job, rank)
        source = open_corpus(job.input, job.keys, job.split, job.subset)
        start, end = source.shard(rank, world_size)
        from_byte = start and source.kind in ("json", "text")
        description = f"{source.description} from byte {start}" if from_byte else source.description
        chunk_job = ChunkJob(job.keys, description, job.settings)
        limit_tokenizer_threads(job.threads)  # None when tasks run one at a time, in the caller's own process
        tok = job_tokenizer(job.tokenizer)
        counts = {c: dict.fromkeys(job.keys, 0) for c in COUNTS}
        records = 0
        builders: Dict[str, IndexedDatasetBuilder] = {}
        logger.info(f"task {rank}/{world_size}: {description}, {source.progress_unit} {start} to {end or 'the end'}")
        try:
            for k in job.keys:
                builders[k] = IndexedDatasetBuilder(job.part_prefix(k, rank) + ".bin", dtype=job.settings.dtype)
            next_log = job.log_interval or None
            for chunk in source.chunks(job.keys, CHUNK_BYTES_IN_PROCESS, DEFAULT_CHUNK_ROWS, start, end):
                with self.track_time(unit="chunk"):
                    enc = encode_chunk(chunk, tok, chunk_job)
                records += enc.records
                self.stat_update("input records", value=enc.records, unit="chunk")
                for k, (tokens, lengths, seqs_per_doc, empty) in enc.per_key.items():
                    if lengths.size:
                        builders[k].add_documents(tokens, lengths, seqs_per_doc)
                    for name, value in zip(COUNTS, (seqs_per_doc.size, lengths.size, tokens.size, empty)):
                        counts[name][k] += int(value)
                    self.stat_update("documents", value=int(seqs_per_doc.size), unit="chunk")
                    self.stat_update("tokens", value=int(tokens.size), unit="chunk")
                    if empty:
                        self.stat_update("empty documents skipped", value=int(empty), unit="chunk")
                if next_log is not None and records >= next_log:
                    logger.info(f"task {rank}: processed {records:,} documents")
                    while next_log <= records:
                        next_log += job.log_interval
            for k, builder in builders.items():
                builder.finalize(job.part_prefix(k, rank) + ".idx", commit=False)
            for builder in builders.values():
                builder.commit()
            atomic_write_json(job.counts_path(rank), {"records": records, **counts})
        except BaseException:
            for builder in builders.values():
                builder.abort()
            raise
        logger.info(f"task {rank}: {records:,} documents read, {sum(counts['tokens'].values()):,} tokens written")


class MergeShards(PipelineStep):
    """One task, after every `TokenizeShard`: the parts, in rank order, into the final pairs; then `merged.json`."""

    name = "megahf merge"
    type = "🔢 - TOKENIZER"

    def __init__(self, job: PreprocessJob) -> None:
        super().__init__()
        self.job = job

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        job = self.job
        if job.finished():
            logger.info(f"already merged: {job.merged_path}")
            shutil.rmtree(os.path.join(job.work_dir, "parts"), ignore_errors=True)
            return
        t0 = time.perf_counter()
        try:
            result = self._merge()
        except (OSError, PreprocessError):
            if job.finished():  # another process merged the same parts meanwhile (several machines ended at once)
                logger.info(f"another process merged the parts: {job.merged_path}")
                return
            raise
        atomic_write_json(job.merged_path, {**asdict(result), "merge_seconds": time.perf_counter() - t0})
        shutil.rmtree(os.path.join(job.work_dir, "parts"), ignore_errors=True)
        where = ", ".join(f"{p}.{{bin,idx}}" for p in result.prefixes.values())
        logger.info(f"merged {job.tasks} parts: {sum(result.documents.values()):,} documents, "
                    f"{result.total_tokens:,} tokens -> {where}")

    def _merge(self) -> PreprocessResult:
        job = self.job
        missing = [r for r in range(job.tasks) if not os.path.isfile(job.counts_path(r))]
        if missing:
            raise PreprocessError(
                f"{job.work_dir}: tasks {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} of "
                f"{job.tasks} have no finished part; run the same command again: it runs only the missing tasks"
            )
        prefixes = job.prefixes
        result = PreprocessResult(prefixes=prefixes, records=0, dtype=job.settings.dtype)
        for name in COUNTS:
            setattr(result, name, dict.fromkeys(job.keys, 0))
        for r in range(job.tasks):
            with open(job.counts_path(r), encoding="utf-8") as f:
                counts = json.load(f)
            result.records += counts["records"]
            for name in COUNTS:
                for k in job.keys:
                    getattr(result, name)[k] += counts[name][k]
        builders: Dict[str, IndexedDatasetBuilder] = {}
        try:
            for k in job.keys:
                builders[k] = IndexedDatasetBuilder(prefixes[k] + ".bin", dtype=job.settings.dtype)
                for r in range(job.tasks):
                    builders[k].add_index(job.part_prefix(k, r))
                    self.stat_update("parts merged")
                self.stat_update("documents", value=result.documents[k], unit="key")
                self.stat_update("tokens", value=result.tokens[k], unit="key")
            # the tokenizer recorded beside the merged pairs, as `megahf preprocess` on one machine records it
            identity = tokenizer_identity(job_tokenizer(job.tokenizer), job.tokenizer)
            publish(builders, prefixes, result, job.input, identity)
        except BaseException:
            for builder in builders.values():
                builder.abort()
            raise
        return result


__all__ = ["MergeShards", "PreprocessJob", "TokenizeShard", "job_tokenizer", "plan_tokenizer"]
