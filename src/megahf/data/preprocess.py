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
    (Megatron's rule); `--dtype` overrides it. Beside each pair, `PREFIX.tokenizer_identity.json`
    records the tokenizer (`tokenizer_record`): a run refuses data made with another one.

Sentence splitting (`--split-sentences`)
    Megatron uses nltk's punkt model, which cannot be had offline; megahf uses `split_sentences`
    (`megahf.data.sentence_splitter`, whose docstring gives its rules: a sentence ends after
    `.`, `!`, `?` or `…` and whitespace before a word not in lower case, except after a common
    abbreviation or an initial; a blank line always ends one). Each sentence becomes one
    sequence; a document is its sentences.

Differences from Megatron's tool, on purpose
    * documents that produce no tokens (empty text) are skipped and counted, instead of being
      written as empty documents;
    * bad input fails before anything is written when it can be seen up front (missing file or
      key, empty corpus, a vocabulary that does not fit the dtype, no eos for `--append-eod`),
      and otherwise removes every temporary file: outputs are written under hidden temporary names
      and renamed only when every key's pair is complete;
    * `--workers 1` tokenizes in the main process, in batches of ~1 MiB of text (the Rust
      tokenizer spreads a batch over its own threads unless `TOKENIZERS_PARALLELISM=false`);
      with more, a process pool tokenizes chunks of ~256 KiB, taken back in input order, each
      worker single-threaded (`TOKENIZERS_PARALLELISM=false`), with a bounded number of chunks
      in flight so memory stays flat on large inputs (`preprocess_workers`).

Many machines (`--executor local|slurm|ray`, `pip install 'megahf[distributed]'`)
    `preprocess_datatrove` runs the same parts as datatrove pipeline steps (`datatrove_steps`): `--tasks`
    contiguous parts of the input, one pair each, merged in input order into the same bytes as this module writes;
    the same command run again does only the missing tasks (see docs/data.md).

The parts, each usable on its own
    `corpus_reader` (what an input is, its chunks, `read_documents` of a file, byte range or record range),
    `sentence_splitter`, `document_tokenizer` (`load_tokenizer`, `tokenize_settings`,
    `tokenize_document` of one document, `encode_documents` of many), `preprocess_workers`
    (chunks -> tokens in this process or a pool), `preprocess_output` (the .bin/.idx pairs,
    written all or none; `PreprocessResult`) and `preprocess_errors` (`PreprocessError`); this
    module runs them for the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

from tqdm.auto import tqdm

from ..errors import MegahfError, explain_write_errors, one_line
from .corpus_reader import DEFAULT_CHUNK_ROWS, open_corpus
from .document_tokenizer import EMBEDDED_TOKENIZER_NAMES, load_tokenizer, tokenize_settings
from .indexed_dataset import IndexedDatasetBuilder
from .preprocess_arguments import ExecutorOptions, add_arguments
from .preprocess_errors import PreprocessError, check_arguments
from .preprocess_output import (PreprocessResult, make_output_folder, output_prefix_for, publish, remove_folders,
                                write_encoded)
from .preprocess_workers import ChunkEncoder, ChunkJob, default_chunk_bytes
from .sentence_splitter import split_sentences
from .tokenizer_record import tokenizer_identity

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
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> PreprocessResult:
    """Tokenize `input` into `{output_prefix}_{key}_{document|sentence}.bin/.idx` per key.

    See the module docstring for inputs, tokenizers and sentence splitting. `progress`: show a
    tqdm bar (`None`: only on a terminal). `log_interval`: also print a line every that many
    documents (0: never). Raises `PreprocessError` (or `FileNotFoundError`) on bad input;
    on any error no output or temporary file is left behind.
    """
    t0 = time.perf_counter()
    keys = tuple(dict.fromkeys(json_keys))
    check_arguments(keys, workers, output_prefix)
    source = open_corpus(input, keys, split, subset)
    tok = load_tokenizer(tokenizer)
    settings = tokenize_settings(tok, tokenizer, append_eod, split_sentences, dtype)
    job = ChunkJob(keys, source.description, settings)
    prefixes = {k: output_prefix_for(output_prefix, k, split_sentences) for k in keys}
    result = PreprocessResult(prefixes=prefixes, records=0, dtype=settings.dtype, workers=workers)
    for k in keys:
        result.documents[k] = result.sequences[k] = result.tokens[k] = result.skipped_empty[k] = 0

    builders: Dict[str, IndexedDatasetBuilder] = {}
    encoder = ChunkEncoder(job, tok, workers)
    outputs = " and ".join(f"{p}.bin/.idx" for p in prefixes.values())
    with explain_write_errors(  # a full disk or an unwritable folder: one clear error, after the cleanup below
        outputs,
        intact=f"nothing was published and the temporary files are removed: any previous {outputs} are intact",
        elsewhere="give an --output-prefix on another disk or folder",
    ):
        made_dirs = make_output_folder(output_prefix)
        try:
            for k in keys:
                builders[k] = IndexedDatasetBuilder(prefixes[k] + ".bin", dtype=settings.dtype)
            if chunk_bytes is None:
                chunk_bytes = default_chunk_bytes(workers)
            encoded = encoder.encode(source.chunks(keys, chunk_bytes, chunk_rows))
            with tqdm(total=source.progress_total, unit=source.progress_unit, unit_scale=True, desc="preprocess",
                      disable=(None if progress is None else not progress), dynamic_ncols=True) as bar:
                write_encoded(encoded, builders, result, bar, log_interval)
            publish(builders, prefixes, result, source.description, tokenizer_identity(tok, tokenizer))
        except BaseException:
            encoder.abort()
            for b in builders.values():
                b.abort()
            remove_folders(made_dirs)
            raise
        finally:
            encoder.close()
    result.seconds = time.perf_counter() - t0
    return result


def run(args: argparse.Namespace) -> int:
    """Run `megahf preprocess` with parsed arguments; returns the exit status."""
    try:
        options = ExecutorOptions.from_args(args)
        common = dict(input=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                      json_keys=args.json_keys, append_eod=args.append_eod, split_sentences=args.split_sentences,
                      dtype=args.dtype, split=args.split, subset=args.subset, log_interval=args.log_interval)
        if options is not None:
            from .preprocess_datatrove import preprocess_datatrove

            result = preprocess_datatrove(options=options, **common)
        else:
            result = preprocess_corpus(workers=1 if args.workers is None else args.workers,
                                       progress=False if getattr(args, "no_progress", False) else None, **common)
    except (MegahfError, FileNotFoundError) as e:
        print(f"megahf preprocess: error: {one_line(e)}", file=sys.stderr)
        return 2
    if result is not None:
        print(result.summary())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megahf preprocess")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
