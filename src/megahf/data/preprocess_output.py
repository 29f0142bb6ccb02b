"""Writing the `.bin`/`.idx` pairs of `megahf preprocess`: their names (`output_prefix_for`), their folder, the
encoded chunks appended to one `IndexedDatasetBuilder` per key and counted (`write_encoded`, `PreprocessResult`),
and publishing all the pairs or none (`publish`): outputs are written under hidden temporary names and renamed only
when every key's pair is complete.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List

from .indexed_dataset import IndexedDatasetBuilder
from .preprocess_errors import PreprocessError
from .preprocess_workers import EncodedChunk
from .tokenizer_record import remove_tokenizer_record, write_tokenizer_record


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
    executor: str = ""  # "datatrove local executor" ...: `workers` then counts its tasks

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
            f"in {self.seconds:.2f} s, {self.tokens_per_second:,.0f} tokens/s, "
            + (f"{self.workers} task(s) on the {self.executor}" if self.executor else f"{self.workers} worker(s)")
            + (f", {skipped:,} empty documents skipped" if skipped else "")
            + f" -> {where}"
        )


def make_output_folder(output_prefix: str) -> List[str]:
    """Create the output folder; return the folders this created, outermost first (removed again on error)."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    made_dirs: List[str] = []
    d = out_dir
    while not os.path.isdir(d):
        made_dirs.insert(0, d)
        d = os.path.dirname(d)
    os.makedirs(out_dir, exist_ok=True)
    return made_dirs


def remove_folders(made_dirs: List[str]) -> None:
    for d in reversed(made_dirs):
        try:
            os.rmdir(d)  # only if still empty
        except OSError:
            break


def write_encoded(encoded: Iterator[EncodedChunk], builders: Dict[str, IndexedDatasetBuilder],
                  result: PreprocessResult, bar: Any, log_interval: int) -> None:
    """Append every encoded chunk to the builders and count it; a log line every `log_interval` documents."""
    next_log = log_interval if log_interval > 0 else None
    t_proc = time.perf_counter()
    for enc in encoded:
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


def publish(builders: Dict[str, IndexedDatasetBuilder], prefixes: Dict[str, str], result: PreprocessResult,
            description: str, tokenizer_identity: Dict[str, Any] | None = None) -> None:
    """Refuse a key without tokens; then publish only when every key's pair is complete: write all indexes, then
    rename; then record beside each pair the tokenizer that made it (`tokenizer_record`; a previous record is removed
    before its pair is replaced)."""
    for k in builders:
        if result.tokens[k] == 0:
            raise PreprocessError(
                f"{description}: empty corpus: the {result.records:,} documents of key {k!r} "
                f"produce no tokens (all texts are empty)"
            )
    for k, builder in builders.items():
        builder.finalize(prefixes[k] + ".idx", commit=False)
    if tokenizer_identity is not None:
        for prefix in prefixes.values():
            remove_tokenizer_record(prefix)
    for k, builder in builders.items():
        builder.commit()
        result.bytes[k] = os.path.getsize(prefixes[k] + ".bin")
    if tokenizer_identity is not None:
        for prefix in prefixes.values():
            write_tokenizer_record(prefix, tokenizer_identity)


__all__ = ["PreprocessResult", "make_output_folder", "output_prefix_for", "publish", "remove_folders",
           "write_encoded"]
