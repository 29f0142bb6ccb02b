"""`megahf preprocess` against tokenizing by hand, across workers and input formats, read back by
megahf and by Megatron-Core; every bad input fails with a message naming the file and leaves
nothing behind."""

import json
import os
import warnings

import numpy as np
import pytest

from required import oracle
from megahf.assets import load_gpt2_tokenizer
from megahf.data.indexed_dataset import IndexedDataset
from megahf.data.preprocess import PreprocessError, main, preprocess_corpus, split_sentences
from megahf.data.tokenizer_record import read_tokenizer_record, tokenizer_identity

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    M = oracle("megatron.core.datasets.indexed_dataset")

DOCS = [
    "Hello world. This is megahf.",
    " Leading space, and unicode: caf\u00e9 \u2014 \u65e5\u672c\u8a9e!",
    "",  # empty: skipped
    "Mr. Smith went to Washington. He stayed!\n\nA new paragraph? yes, it is.",
    "x" * 3000 + " the end.",
] + [f"Document number {i}. It has two sentences." for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return load_gpt2_tokenizer()


def write_jsonl(path, docs, key="text", extra=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            rec = {key: d, "id": i} if extra else {key: d}
            f.write(json.dumps(rec) + "\n")
    return str(path)


def expected_docs(tok, docs, eod=True):
    out = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if ids:
            out.append(ids + ([tok.eos_token_id] if eod else []))
    return out


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    di = ds.document_indices
    return [np.concatenate([ds[j] for j in range(di[i], di[i + 1])]).tolist() for i in range(len(di) - 1)]


def files_in(path):
    return sorted(os.listdir(path))


# ----------------------------------------------------------------------------- correctness
def test_matches_hand_tokenization_and_megatron_reads_it(tmp_path, tok):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    res = preprocess_corpus(corpus, str(tmp_path / "out" / "my"), tokenizer="gpt2", append_eod=True, progress=False)
    prefix = str(tmp_path / "out" / "my_text_document")
    assert res.prefixes == {"text": prefix}
    want = expected_docs(tok, DOCS)
    assert read_docs(prefix) == want
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.uint16 and len(ours) == len(want)  # one sequence per document
    assert res.documents["text"] == len(want) and res.skipped_empty["text"] == 1 and res.records == len(DOCS)
    assert res.tokens["text"] == sum(map(len, want)) and res.bytes["text"] == 2 * res.tokens["text"]
    theirs = M.IndexedDataset(prefix)
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])
    # beside the pair, the tokenizer that made it (megahf.data.tokenizer_record), which a run checks its own against
    assert files_in(tmp_path / "out") == ["my_text_document.bin", "my_text_document.idx",
                                          "my_text_document.tokenizer_identity.json"]
    assert read_tokenizer_record(prefix) == tokenizer_identity(tok, "gpt2")


def test_one_and_two_workers_write_identical_files(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 3)
    for workers in (1, 2):  # tiny chunks: many chunks, so order across workers matters
        preprocess_corpus(corpus, str(tmp_path / f"w{workers}"), append_eod=True, workers=workers, chunk_bytes=200, progress=False)
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert a == (tmp_path / f"w2_text_document{ext}").read_bytes()


def test_split_sentences(tmp_path, tok):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    res = preprocess_corpus(corpus, str(tmp_path / "s"), append_eod=True, split_sentences=True, workers=2, progress=False)
    ds = IndexedDataset(res.prefixes["text"])
    assert res.prefixes["text"].endswith("s_text_sentence")
    nonempty = [d for d in DOCS if d]
    assert ds.num_documents == len(nonempty)
    for d, text in enumerate(nonempty):
        seqs = [ds[j].tolist() for j in range(ds.document_indices[d], ds.document_indices[d + 1])]
        want = [tok(s, add_special_tokens=False)["input_ids"] for s in split_sentences(text)]
        want[-1] = want[-1] + [tok.eos_token_id]
        assert seqs == want
    # "Mr. Smith went to Washington." / "He stayed!" / "A new paragraph? yes, it is."
    assert ds.document_indices[3] - ds.document_indices[2] == 3


def test_sentence_splitter_rules():
    assert split_sentences("Mr. Smith came. He left! Did he? yes.\n\nNew paragraph") == [
        "Mr. Smith came.", "He left!", "Did he? yes.", "New paragraph"]
    assert split_sentences('"Stop!" he said. "Why?" She asked. J. R. Tolkien wrote 3.5 pages. See e.g. The Hobbit.') == [
        '"Stop!" he said.', '"Why?"', "She asked.", "J. R. Tolkien wrote 3.5 pages.", "See e.g. The Hobbit."]
    assert split_sentences("  \n ") == []


def test_no_eod_and_two_keys(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(DOCS[:5]):
            f.write(json.dumps({"text": d, "title": f"Title {i}"}) + "\n")
    res = preprocess_corpus(str(path), str(tmp_path / "k"), json_keys=["text", "title"], progress=False)
    assert read_docs(res.prefixes["text"]) == expected_docs(tok, DOCS[:5], eod=False)
    assert read_docs(res.prefixes["title"]) == expected_docs(tok, [f"Title {i}" for i in range(5)], eod=False)


def test_txt_parquet_json_array_and_folder_inputs(tmp_path, tok):
    docs = ["first line", "second line", "third one"]
    want = expected_docs(tok, docs)
    (tmp_path / "c.txt").write_text("first line\n\n   \nsecond line\r\nthird one")  # blank lines are not documents
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", docs)
    for name in ("c.txt", "c.json", "c.parquet", "folder"):
        res = preprocess_corpus(str(tmp_path / name), str(tmp_path / "o" / name), append_eod=True, progress=False)
        assert read_docs(res.prefixes["text"]) == want, name


def test_big_vocabulary_gives_int32_and_tokenizer_from_a_folder(tmp_path):
    """A tokenizer of 70,000 ids (no eos) loaded with AutoTokenizer: int32 tokens; --append-eod refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"] = 70000
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "c.jsonl", ["w1 w69999 w5", "w65535 w65536"])
    res = preprocess_corpus(corpus, str(tmp_path / "big"), tokenizer=str(tmp_path / "tok"), progress=False)
    ds = IndexedDataset(res.prefixes["text"])
    assert ds.dtype == np.int32 and read_docs(res.prefixes["text"]) == [[1, 69999, 5], [65535, 65536]]
    theirs = M.IndexedDataset(res.prefixes["text"])  # keep it referenced: its views die with it
    np.testing.assert_array_equal(theirs[0], [1, 69999, 5])
    assert read_tokenizer_record(res.prefixes["text"])["vocab_size"] == 70001
    with pytest.raises(PreprocessError, match="neither an eos nor a sep"):
        preprocess_corpus(corpus, str(tmp_path / "eod"), tokenizer=str(tmp_path / "tok"), append_eod=True, progress=False)
    assert not any(n.startswith("eod") for n in os.listdir(tmp_path))


def test_cli_main(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:3])
    rc = main(["--input", corpus, "--tokenizer", "embedded", "--output-prefix", str(tmp_path / "cli"),
               "--append-eod", "--workers", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "tokens/s" in out and "cli_text_document" in out
    rc = main(["--input", corpus, "--tokenizer", "gpt2", "--json-keys", "body", "--output-prefix", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "no key 'body'" in err and "c.jsonl" in err


# ----------------------------------------------------------------------------- bad input
def test_missing_key_names_key_file_and_keys_present(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS, key="content")
    with pytest.raises(PreprocessError) as e:
        preprocess_corpus(corpus, str(tmp_path / "out" / "x"), progress=False)
    msg = str(e.value)
    assert "'text'" in msg and "c.jsonl" in msg and "line 1" in msg and "'content'" in msg and "'id'" in msg
    assert files_in(tmp_path) == ["c.jsonl"]  # not even the output folder


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_key_on_a_later_line_leaves_nothing(tmp_path, workers):
    lines = [json.dumps({"text": d}) for d in DOCS * 4]
    lines[150] = json.dumps({"txt": "oops"})
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PreprocessError, match=r"c\.jsonl, line 151: no key 'text' \(keys present: 'txt'\)"):
        preprocess_corpus(str(tmp_path / "c.jsonl"), str(tmp_path / "new" / "deep" / "x"), workers=workers,
                          chunk_bytes=500, progress=False)
    assert files_in(tmp_path) == ["c.jsonl"]  # no temporary file, and the folders made for the output are gone


def test_missing_key_in_a_json_array_with_two_workers(tmp_path):
    records = [{"text": f"hello {i}"} for i in range(3000)]
    records[2500] = {"body": "x"}
    (tmp_path / "c.json").write_text(json.dumps(records))
    with pytest.raises(PreprocessError, match=r"c\.json, record 2500: no key 'text' \(keys present: 'body'\)"):
        preprocess_corpus(str(tmp_path / "c.json"), str(tmp_path / "x"), workers=2, progress=False)
    assert files_in(tmp_path) == ["c.json"]


def test_invalid_json_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(PreprocessError, match=r"c\.jsonl, line 2: not valid JSON"):
        preprocess_corpus(str(tmp_path / "c.jsonl"), str(tmp_path / "x"), progress=False)
    assert files_in(tmp_path) == ["c.jsonl"]


def test_non_string_value(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ["fine", None])
    with pytest.raises(PreprocessError, match=r"c\.jsonl, line 2: the value of 'text' is null"):
        preprocess_corpus(str(tmp_path / "c.jsonl"), str(tmp_path / "x"), progress=False)
    assert files_in(tmp_path) == ["c.jsonl"]


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(PreprocessError, match=r"blank\.jsonl: empty corpus"):
        preprocess_corpus(str(tmp_path / "blank.jsonl"), str(tmp_path / "x"), progress=False)
    write_jsonl(tmp_path / "empty_texts.jsonl", ["", "", ""])
    with pytest.raises(PreprocessError, match=r"empty_texts\.jsonl: empty corpus.*produce no tokens"):
        preprocess_corpus(str(tmp_path / "empty_texts.jsonl"), str(tmp_path / "x"), workers=2, progress=False)
    assert files_in(tmp_path) == ["blank.jsonl", "empty_texts.jsonl"]


def test_vocabulary_does_not_fit_dtype(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    with pytest.raises(PreprocessError, match=r"'gpt2' has 50,257 ids.*--dtype int16.*--dtype auto \(uint16\)"):
        preprocess_corpus(corpus, str(tmp_path / "x"), dtype="int16", progress=False)
    assert files_in(tmp_path) == ["c.jsonl"]


def test_missing_input_and_unsupported_type(tmp_path):
    with pytest.raises(PreprocessError, match=r"nope\.jsonl.*does not exist"):
        preprocess_corpus(str(tmp_path / "nope.jsonl"), str(tmp_path / "x"), progress=False)
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(PreprocessError, match=r"c\.csv: unsupported file type"):
        preprocess_corpus(str(tmp_path / "c.csv"), str(tmp_path / "x"), progress=False)


def test_uncached_hub_dataset_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(PreprocessError, match=r"could not load dataset 'no-such-org/no-such-dataset'.*offline"):
        preprocess_corpus("no-such-org/no-such-dataset", str(tmp_path / "x"), progress=False)
    assert files_in(tmp_path) == []
