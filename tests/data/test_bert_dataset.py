"""megahf's BertDataset against Megatron-Core 0.16.1's BERTMaskedWordPieceDataset (the test-only
oracle): the same sample mapping (against the compiled ``helpers.build_mapping``) and, sample by
sample, the same tokens, masked positions, labels, token types, padding and SOP labels; then the
statistical properties (masking rate, 80/10/10, SOP balance), determinism, the cache and the
errors."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from required import oracle
from megahf.data.bert_dataset import (
    IGNORE_INDEX,
    BertDataset,
    BertDatasetConfig,
    BertDatasetError,
    build_bert_sample_mapping,
)
from megahf.data.gpt_dataset import split_ranges
from megahf.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


PAD, CLS, SEP, MASK = 0, 1, 2, 3
VOCAB = 200  # ids 4..199 are words; every id divisible by 5 is a "##" piece
SEQ = 64


def vocab_strings():
    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    for i in range(4, VOCAB):
        words.append(f"##w{i}" if i % 5 == 0 else f"w{i}")
    return words


class Tok:
    """The tokenizer attributes Megatron-Core's BERT dataset reads."""

    def __init__(self):
        self.inv_vocab = dict(enumerate(vocab_strings()))
        self.vocab = {v: k for k, v in self.inv_vocab.items()}
        self.vocab_size = VOCAB
        self.cls, self.sep, self.mask, self.pad = CLS, SEP, MASK, PAD
        self.unique_identifiers = {"class": "Tok"}


def write_corpus(prefix, n_docs=160, seed=0, long_every=37):
    """Documents of 0..7 sentences of 1..40 word ids; some with a sentence over 512 tokens."""
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in range(n_docs):
        n_sent = int(rng.integers(0, 8))
        lengths = [int(rng.integers(1, 41)) for _ in range(n_sent)]
        if long_every and d % long_every == 5 and lengths:
            lengths[0] = 600
        for length in lengths:
            b.add_item(rng.integers(4, VOCAB, size=length))
        b.end_document()
    b.finalize(f"{prefix}.idx")
    return prefix


def config(**kw):
    kw.setdefault("seq_length", SEQ)
    kw.setdefault("split", "1,0,0")
    return BertDatasetConfig(
        vocab_size=VOCAB, cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK, pad_token_id=PAD, **kw
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("bert") / "c_text_sentence"))


def mcore_dataset(prefix, docs, num_samples, tmp_path, monkeypatch, seed=1234, seq=SEQ, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MI = oracle("megatron.core.datasets.indexed_dataset")
        MBERT = oracle("megatron.core.datasets.bert_dataset")
        MU = oracle("megatron.core.datasets.utils")
        oracle("megatron.core.datasets.helpers_cpp")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    opts = dict(
        masking_probability=0.15,
        short_sequence_probability=0.1,
        masking_max_ngram=3,
        masking_do_full_word=False,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=True,
    )
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = MBERT.BERTMaskedWordPieceDatasetConfig(
            random_seed=seed,
            sequence_length=seq,
            blend=([prefix], None),
            split="1,0,0",
            path_to_cache=str(tmp_path / "mcore_cache"),
            tokenizer=Tok(),
            **opts,
        )
        indexed = MI.IndexedDataset(prefix)
        return MBERT.BERTMaskedWordPieceDataset(
            indexed, prefix, np.arange(docs.start, docs.stop), num_samples, MU.Split.train, cfg
        )


def assert_same_samples(ours, theirs):
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(np.asarray(ours.sample_index), np.asarray(theirs.sample_index))
    truncated = 0
    for i in range(len(ours)):
        a = ours.get_example(i)
        b = theirs[i]
        np.testing.assert_array_equal(a["input_ids"], b["text"], err_msg=f"sample {i}")
        np.testing.assert_array_equal(a["token_type_ids"], b["types"])  # Megatron pads types with pad = 0
        # Megatron's padding mask is 0 wherever the text holds the pad id (here 0), also where
        # a masked token was replaced by a random draw of the pad id; megahf attends to it
        drawn_pad = (a["input_ids"] == PAD) & (a["labels"] != IGNORE_INDEX)
        np.testing.assert_array_equal(np.where(drawn_pad, 0, a["attention_mask"]), b["padding_mask"])
        np.testing.assert_array_equal(np.where(a["labels"] == IGNORE_INDEX, -1, a["labels"]), b["labels"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"].astype(np.float32))
        assert int(a["next_sentence_label"]) == b["is_random"]
        assert int(a["truncated"]) == b["truncated"]
        truncated += b["truncated"]
    assert truncated > 0  # the comparison covered truncation


@pytest.mark.parametrize(
    "docs,num_samples,seed,kw",
    [
        (range(0, 120), 200, 1234, {}),  # several passes over the documents
        (range(30, 160), 50, 7, {"short_sequence_probability": 0.4}),  # C round(2.5) = 3
    ],
)
def test_same_as_megatron_core(corpus, tmp_path, monkeypatch, docs, num_samples, seed, kw):
    theirs = mcore_dataset(corpus, docs, num_samples, tmp_path, monkeypatch, seed=seed, **kw)
    ours = BertDataset(IndexedDataset(corpus), docs, num_samples, config(seed=seed, **kw))
    if num_samples is not None:
        assert len(ours) >= num_samples
    assert_same_samples(ours, theirs)


def test_same_as_megatron_core_whole_word(corpus, tmp_path, monkeypatch):
    docs = range(0, 80)
    theirs = mcore_dataset(corpus, docs, 50, tmp_path, monkeypatch, masking_do_full_word=True)
    ours = BertDataset(
        IndexedDataset(corpus), docs, 50, config(whole_word_masking=True, vocab=vocab_strings())
    )
    assert_same_samples(ours, theirs)
    # a "##" piece (id % 5 == 0) after a word is masked exactly when that word is
    plain = BertDataset(IndexedDataset(corpus), docs, 50, config())
    differs = False
    for i in range(len(ours)):
        ex = ours.get_example(i)
        masked = ex["labels"] != IGNORE_INDEX
        text = np.where(masked, ex["labels"], ex["input_ids"])
        piece = (text % 5 == 0) & (text >= 4)
        piece[1:] &= ~np.isin(text[:-1], [CLS, SEP])
        np.testing.assert_array_equal(masked[1:][piece[1:]], masked[:-1][piece[1:]])
        differs |= not np.array_equal(ex["labels"], plain.get_example(i)["labels"])
    assert differs


def test_mapping_against_helpers(corpus):
    helpers = oracle("megatron.core.datasets.helpers")
    ds = IndexedDataset(corpus)
    bounds = np.asarray(ds.document_indices)
    for seed, p, min_sent, n, max_len in [(1, 0.1, 2, 50, 61), (99, 0.0, 1, 900, 20), (5, 1.0, 2, 10, 3)]:
        want = helpers.build_mapping(bounds, ds.sequence_lengths, 2**31 - 2, n, max_len, p, seed, False, min_sent)
        got = build_bert_sample_mapping(bounds[:-1], bounds[1:], ds.sequence_lengths, n, max_len, p, seed, min_sent)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_sample_structure_and_statistics(corpus):
    ds = BertDataset(IndexedDataset(corpus), range(0, 160), 1500, config(seed=3))
    masked = replaced_mask = replaced_random = kept = candidates = sop = 0
    lengths = []
    for i in range(len(ds)):
        ex = ds[i]
        ids = ex["input_ids"].numpy()
        types = ex["token_type_ids"].numpy()
        att = ex["attention_mask"].numpy()
        labels = ex["labels"].numpy()
        loss = ex["loss_mask"].numpy()
        assert ids.shape == (SEQ,) and ex["next_sentence_label"].shape == ()
        n = int(att.sum())
        lengths.append(n)
        assert att[:n].all() and not att[n:].any()
        assert (ids[n:] == PAD).all() and (types[n:] == 0).all()
        pos = np.flatnonzero(labels != IGNORE_INDEX)
        text = ids.copy()
        text[pos] = labels[pos]  # the text before masking (a random replacement may be any id)
        seps = np.flatnonzero(text[:n] == SEP)
        assert text[0] == CLS and len(seps) == 2 and seps[-1] == n - 1 and (text[1:n] != CLS).all()
        # segment A (type 0) through the first [SEP], B (type 1) through the last
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all()
        assert seps[0] >= 2 and seps[1] - seps[0] >= 2  # both segments non-empty
        np.testing.assert_array_equal(pos, np.flatnonzero(loss))
        assert not np.isin(pos, [0, *seps]).any()  # never [CLS]/[SEP]
        assert (labels[pos] >= 4).all()
        masked += pos.size
        candidates += n - 3
        replaced_mask += int((ids[pos] == MASK).sum())
        same = ids[pos] == labels[pos]
        kept += int(same.sum())
        replaced_random += int(((ids[pos] != MASK) & ~same).sum())
        sop += int(ex["next_sentence_label"])
    assert max(lengths) <= SEQ and max(lengths) == SEQ
    assert 0.13 < masked / candidates < 0.16, masked / candidates
    # 80/10/10 (a random replacement can draw the token itself or [MASK]: ~0.5% each way)
    assert abs(replaced_mask / masked - 0.8) < 0.02
    assert abs(kept / masked - 0.1) < 0.02
    assert abs(replaced_random / masked - 0.1) < 0.02
    assert abs(sop / len(ds) - 0.5) < 0.04
    # about 10% of the samples target a random shorter length
    assert 0.04 < np.mean(np.asarray(ds.sample_index[:, 2]) < SEQ - 3) < 0.16


def test_sentences_come_from_one_document_and_skips(corpus):
    idx = IndexedDataset(corpus)
    bounds = np.asarray(idx.document_indices)
    ds = BertDataset(idx, range(0, 160), None, config())
    counts = np.diff(bounds)
    long_docs = {d for d in range(160) if (np.asarray(idx.sequence_lengths)[bounds[d] : bounds[d + 1]] > 512).any()}
    assert long_docs
    used = set()
    for first, end, target in np.asarray(ds.sample_index).tolist():
        d = int(np.searchsorted(bounds, first, side="right")) - 1
        assert bounds[d] <= first < end <= bounds[d + 1] and end - first >= 2 and 2 <= target <= SEQ - 3
        used.add(d)
    assert used == {d for d in range(160) if counts[d] >= 2 and d not in long_docs}
    # without SOP a single sentence is a sample (one segment, [CLS] A [SEP])
    ds1 = BertDataset(idx, range(0, 160), None, config(sentence_order_prediction=False))
    assert len(ds1) > len(ds)
    ex = ds1[0]
    assert "next_sentence_label" not in ex and int(ex["token_type_ids"].sum()) == 0
    assert int((ex["input_ids"] == SEP).sum()) == 1


def test_deterministic_and_order_independent(corpus, tmp_path):
    idx = IndexedDataset(corpus)
    a = BertDataset(idx, range(0, 100), 300, config(seed=11))
    b = BertDataset(idx, range(0, 100), 300, config(seed=11, path_to_cache=str(tmp_path)))
    order = np.random.default_rng(0).permutation(len(a))
    forward = {i: a[i] for i in range(len(a))}
    for i in order[:100]:
        for k, v in b[int(i)].items():
            assert torch.equal(v, forward[int(i)][k])
    # the cache: reused, pickled, and a different seed gives other samples
    c = BertDataset(idx, range(0, 100), 300, config(seed=11, path_to_cache=str(tmp_path)))
    assert c.loaded_from_cache and not b.loaded_from_cache
    d = pickle.loads(pickle.dumps(c))
    assert torch.equal(d[5]["input_ids"], a[5]["input_ids"])
    e = BertDataset(idx, range(0, 100), 300, config(seed=12, path_to_cache=str(tmp_path)))
    assert not e.loaded_from_cache
    assert any(not torch.equal(e[i]["input_ids"], a[i]["input_ids"]) for i in range(10))


def test_errors(tmp_path, corpus):
    with pytest.raises(BertDatasetError, match="too small"):
        config(seq_length=4)
    with pytest.raises(BertDatasetError, match="seed"):
        config(seed=0)
    with pytest.raises(BertDatasetError, match="vocab"):
        config(whole_word_masking=True)
    idx = IndexedDataset(corpus)
    # an empty split (a 1% test split of 40 documents)
    docs = split_ranges(40, "969,30,1")[2]
    with pytest.raises(BertDatasetError, match="test split .* is empty"):
        BertDataset(idx, docs, 10, config(split="969,30,1"), "test")
    with pytest.raises(BertDatasetError, match="num_samples"):
        BertDataset(idx, range(0, 10), 0, config())
    # documents written without sentence splitting
    b = IndexedDatasetBuilder(str(tmp_path / "d_text_document.bin"), dtype=np.uint16)
    for n in range(1, 20):
        b.add_item(np.arange(4, 4 + n))
        b.end_document()
    b.finalize(str(tmp_path / "d_text_document.idx"))
    with pytest.raises(BertDatasetError, match="split-sentences"):
        BertDataset(IndexedDataset(str(tmp_path / "d_text_document")), range(0, 19), 10, config())
    # a split whose documents cannot make a sample (all have a sentence over 512 tokens)
    b = IndexedDatasetBuilder(str(tmp_path / "l_text_sentence.bin"), dtype=np.uint16)
    for _ in range(5):
        b.add_item(np.full(600, 7))
        b.add_item(np.full(3, 8))
        b.end_document()
    b.finalize(str(tmp_path / "l_text_sentence.idx"))
    with pytest.raises(BertDatasetError, match="no document that can make a sample"):
        BertDataset(IndexedDataset(str(tmp_path / "l_text_sentence")), range(0, 5), 10, config())


def test_from_tokenizer():
    class HFTok:  # the attributes of a transformers BertTokenizer(Fast)
        cls_token_id, sep_token_id, mask_token_id, pad_token_id = CLS, SEP, MASK, PAD

        def __len__(self):
            return VOCAB

        def convert_ids_to_tokens(self, ids):
            return [vocab_strings()[i] for i in ids]

    cfg = BertDatasetConfig.from_tokenizer(HFTok(), 128, whole_word_masking=True, seed=5)
    assert (cfg.vocab_size, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id, cfg.pad_token_id) == (
        VOCAB, CLS, SEP, MASK, PAD,
    )
    assert cfg.vocab[5] == "##w5" and cfg.max_seq_length == 125 and cfg.min_sentences == 2
    assert BertDatasetConfig.from_tokenizer(HFTok(), 128).vocab is None


def test_on_preprocessed_corpus(tmp_path):
    """`megahf preprocess --split-sentences` output makes samples; the document output is refused."""
    import json

    from megahf.data.preprocess import preprocess_corpus

    texts = [f"Story {i} starts here. Then it goes on a while. It ends well." for i in range(12)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sent = preprocess_corpus(str(corpus), str(tmp_path / "s"), tokenizer="gpt2", split_sentences=True, progress=False)
    doc = preprocess_corpus(str(corpus), str(tmp_path / "d"), tokenizer="gpt2", progress=False)
    # GPT-2 ids stand in for WordPiece ones
    cfg = BertDatasetConfig(
        seq_length=24, vocab_size=50257, cls_token_id=50256, sep_token_id=50255, mask_token_id=50254,
        pad_token_id=50253, split="10,2,0",
    )
    indexed = IndexedDataset(sent.prefixes["text"])
    train, valid, _ = split_ranges(indexed.num_documents, cfg.split)
    ds = BertDataset(indexed, train, 30, cfg)
    assert len(ds) >= 30 and BertDataset(indexed, valid, None, cfg, "valid")[0]["input_ids"].shape == (24,)
    ex = ds[0]
    assert int(ex["input_ids"][0]) == 50256 and int((ex["attention_mask"]).sum()) <= 24
    with pytest.raises(BertDatasetError, match="split-sentences"):
        BertDataset(IndexedDataset(doc.prefixes["text"]), train, 30, cfg)
