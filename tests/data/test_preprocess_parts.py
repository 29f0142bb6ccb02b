"""The parts of `megahf preprocess` used on their own (as a datatrove pipeline step would): documents read one by
one, from a whole file or from byte ranges that tile it, and tokenized one at a time into an IndexedDatasetBuilder,
give the same documents and the same .bin/.idx bytes as `preprocess_corpus`."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megahf.data.corpus_reader import open_corpus, read_documents
from megahf.data.document_tokenizer import load_tokenizer, tokenize_document, tokenize_settings
from megahf.data.indexed_dataset import IndexedDatasetBuilder
from megahf.data.preprocess import preprocess_corpus
from megahf.data.preprocess_errors import PreprocessError

DOCS = ["Hello world. This is megahf.", "", "Mr. Smith went to Washington. He stayed!\n\nA new paragraph? yes.",
        " caf\u00e9 \u2014 \u65e5\u672c\u8a9e!"] + [f"Document number {i}. It has two sentences." for i in range(60)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"text": text, "id": i}) + "\n" + ("\n" if i % 9 == 0 else ""))
    return str(path)


def test_byte_ranges_that_tile_a_file_read_every_document_once(corpus):
    whole = list(read_documents(corpus, ["text"]))
    assert [values["text"] for _, values in whole] == DOCS
    assert whole[2][0].endswith("c.jsonl, line 4")  # blank lines count, as in preprocess's messages
    size = len(open(corpus, "rb").read())
    for seed in range(5):
        cuts = sorted(random.Random(seed).sample(range(1, size), 6))
        bounds = list(zip([0, *cuts], [*cuts, size]))
        ranges = [list(read_documents(corpus, ["text"], start, end)) for start, end in bounds]
        assert [values for part in ranges for _, values in part] == [values for _, values in whole]
        later = next(part for part, (start, _) in zip(ranges, bounds) if start and part)
        assert "from byte" in later[0][0]


@pytest.mark.parametrize("kind", ["parquet", "json-array", "datasets-folder"])
def test_record_ranges_of_a_columnar_input_tile_it(tmp_path, kind):
    if kind == "parquet":  # row groups of 7 rows: ranges start and stop inside them
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": DOCS}), path, row_group_size=7)
    elif kind == "json-array":
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"text": t} for t in DOCS]))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        pq.write_table(pa.table({"text": DOCS}), path / "train-00000-of-00001.parquet")
    whole = list(read_documents(str(path)))
    assert [values["text"] for _, values in whole] == DOCS
    source = open_corpus(str(path), ["text"])
    for parts in (3, 5):
        bounds = [source.shard(r, parts) for r in range(parts)]
        assert [end - start for start, end in bounds[:-1]] == [len(DOCS) * (r + 1) // parts - len(DOCS) * r // parts
                                                               for r in range(parts - 1)]
        ranges = [list(read_documents(str(path), start=start, end=end)) for start, end in bounds]
        assert [values for part in ranges for _, values in part] == [values for _, values in whole]
        assert [loc for part in ranges for loc, _ in part] == [loc for loc, _ in whole]  # record numbers stay absolute


@pytest.mark.parametrize("split_sentences", [False, True], ids=["documents", "sentences"])
def test_one_document_at_a_time_writes_the_bytes_preprocess_writes(tmp_path, corpus, split_sentences):
    result = preprocess_corpus(corpus, str(tmp_path / "whole"), append_eod=True, split_sentences=split_sentences,
                               progress=False)
    tokenizer = load_tokenizer("gpt2")
    settings = tokenize_settings(tokenizer, "gpt2", append_eod=True, split_sentences=split_sentences)
    prefix = str(tmp_path / "parts")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=settings.dtype)
    for location, values in read_documents(corpus):
        tokens, lengths = tokenize_document(values["text"], tokenizer, settings, location=location)
        if lengths.size:  # a document without tokens is skipped, as preprocess skips it
            builder.add_document(tokens, lengths)
    builder.finalize(prefix + ".idx")
    for suffix in (".bin", ".idx"):
        assert open(prefix + suffix, "rb").read() == open(result.prefixes["text"] + suffix, "rb").read()
