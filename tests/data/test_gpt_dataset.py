"""megahf's GPTDataset / BlendedDataset against Megatron-Core 0.16.1 itself (the test-only oracle,
see scripts/requirements-test.txt): the same index arrays and the same tokens for every sample,
in the same order, for every split, for one and several epochs (both sides of the 80% rule),
for blends; the index builders against the compiled ``helpers_cpp``; the cache; the errors."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from required import oracle
from megahf.data.blended_dataset import BlendedDataset, build_gpt_datasets, parse_blend, source_sizes
from megahf.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    GPTDatasetError,
    ltor_masks_and_position_ids,
    split_ranges,
)
from megahf.data.indexed_dataset import IndexedDataset
from megahf.data.sample_index import (
    build_blending_indices,
    build_exhaustive_blending_indices,
    build_sample_index,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    MI = oracle("megatron.core.datasets.indexed_dataset")
    MG = oracle("megatron.core.datasets.gpt_dataset")
    MB = oracle("megatron.core.datasets.blended_megatron_dataset_builder")
    MC = oracle("megatron.core.datasets.blended_megatron_dataset_config")
    MBD = oracle("megatron.core.datasets.blended_dataset")
    helpers_cpp = oracle("megatron.core.datasets.helpers_cpp")
    from megatron.core.datasets import helpers as mhelpers

EOD, PAD = 0, 1
SEQ = 64
SPLIT = "80,15,5"


class Tok:
    """The few tokenizer attributes Megatron-Core's GPT dataset reads."""

    vocab_size = 1000
    eod = EOD
    pad = PAD
    unique_identifiers = {"class": "Tok"}


def write_corpus(prefix, n_docs, seed, max_len=200):
    """Megatron-Core's own builder: documents of 1..max_len uint16 tokens in [2, 1000), each
    ending with EOD."""
    rng = np.random.default_rng(seed)
    b = MI.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = rng.integers(2, 1000, int(rng.integers(1, max_len + 1)))
        doc[-1] = EOD
        b.add_item(torch.from_numpy(doc.astype(np.int64)))
        b.end_document()
    b.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_corpus")
    return [
        write_corpus(d / "a", 300, 0),
        write_corpus(d / "b", 250, 1),
        write_corpus(d / "c", 400, 2, max_len=120),
    ]


def mcore(blend, sizes, tmp_path, split=SPLIT, seed=1234, seq=SEQ, cache=True, blend_per_split=None, **kw):
    """Megatron-Core's datasets through its BlendedMegatronDatasetBuilder, on CPU, no torch.distributed.

    Its BlendedDataset calls torch.distributed.get_rank() when it has a cache folder, so blends
    run with path_to_cache=None (the GPTDatasets then cache next to the data, keyed by settings).
    """
    kw.setdefault("reset_position_ids", False)
    kw.setdefault("reset_attention_mask", False)
    kw.setdefault("eod_mask_loss", False)
    cfg = MG.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq,
        blend=blend,
        blend_per_split=blend_per_split,
        split=None if blend_per_split else split,
        path_to_cache=str(tmp_path / "mcore_cache") if cache else None,
        tokenizer=Tok(),
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MB.BlendedMegatronDatasetBuilder(MG.GPTDataset, list(sizes), lambda: True, cfg).build()


def megahf_cfg(tmp_path, seed=1234, seq=SEQ, split=SPLIT, cache=True, **kw):
    return GPTDatasetConfig(
        seq_length=seq,
        seed=seed,
        split=split,
        path_to_cache=str(tmp_path / "megahf_cache") if cache else None,
        **kw,
    )


def assert_same_gpt(ours, theirs):
    assert len(ours) == len(theirs)
    for name in ("document_index", "sample_index", "shuffle_index"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for i in range(len(theirs)):
        ref = theirs._query_document_sample_shuffle_indices(i)[0]
        np.testing.assert_array_equal(ours.get_tokens(i), ref, err_msg=f"sample {i}")


def tokens_per_split(prefix, split=SPLIT):
    lengths = IndexedDataset(prefix).sequence_lengths
    return [None if r is None else int(lengths[r.start : r.stop].sum()) for r in split_ranges(len(lengths), split)]


# ------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("n", [1, 7, 10, 300, 499, 500, 501, 1001, 12345])
@pytest.mark.parametrize("split", ["969,30,1", "80,15,5", "25,75", "35,65", "98,2,0", "1", "1,1,1", "0.5/0.25/0.25"])
def test_split_ranges_match_megatron(n, split):
    vec = MC.parse_and_normalize_split(split)
    ref = [
        None if b is None else range(int(round(b[0] * float(n))), int(round(b[1] * float(n))))
        for b in MC.convert_split_vector_to_split_matrix(vec)
    ]
    assert split_ranges(n, split) == ref


def test_split_rounds_half_to_even():
    assert split_ranges(10, "25,75")[0] == range(0, 2)  # 2.5 -> 2
    assert split_ranges(10, "35,65")[0] == range(0, 4)  # 3.5 -> 4
    assert split_ranges(10, "98,2,0")[2] is None
    with pytest.raises(GPTDatasetError):
        split_ranges(10, "1,2,3,4")
    with pytest.raises(GPTDatasetError):
        split_ranges(10, "0,0,0")


# ----------------------------------------------------------------------- one file, all splits
@pytest.mark.parametrize("epochs", [0.5, 1.0, 2.5, 2.9, 7.0])
def test_samples_match_megatron(corpora, tmp_path, epochs):
    """Every sample of every split, for a request of 0.5 to 7 epochs (2.5 separates the last
    epoch by the 80% rule, 2.9 and 7 do not)."""
    prefix = corpora[0]
    per_epoch = [(t - 1) // SEQ for t in tokens_per_split(prefix)]
    sizes = [max(1, int(epochs * p)) for p in per_epoch]
    theirs = mcore(([prefix], None), sizes, tmp_path)
    ours = build_gpt_datasets(([prefix], None), sizes, megahf_cfg(tmp_path))
    for o, t, size in zip(ours, theirs, sizes):
        assert isinstance(o, GPTDataset) and len(o) >= size
        assert_same_gpt(o, t)
    train = ours[0]
    assert train.num_epochs == max(1, int(np.ceil((sizes[0] * SEQ + 1) / train.tokens_per_epoch)))
    assert train.separate_last_epoch == (epochs == 2.5)


@pytest.mark.parametrize("seed,seq", [(0, 16), (42, 100), (7, 257)])
def test_seeds_and_lengths_match_megatron(corpora, tmp_path, seed, seq):
    prefix = corpora[2]
    sizes = [900, 300, 50]
    theirs = mcore(([prefix], None), sizes, tmp_path, seed=seed, seq=seq, split="70,20,10")
    ours = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path, seed=seed, seq=seq, split="70,20,10"))
    for o, t in zip(ours, theirs):
        assert_same_gpt(o, t)


def test_one_epoch_when_size_is_none(corpora, tmp_path):
    theirs = mcore(([corpora[1]], None), [None, None, None], tmp_path)
    ours = build_gpt_datasets(([corpora[1]], None), [None, None, None], megahf_cfg(tmp_path))
    for o, t in zip(ours, theirs):
        assert o.num_epochs == 1
        assert_same_gpt(o, t)


def test_no_extra_token_and_partial_validation_sample(corpora, tmp_path):
    """add_extra_token_to_sequence=False and a kept (padded) last validation sample: tokens, and
    Megatron's tokens / labels / loss_mask / position_ids from dataset[i]."""
    prefix = corpora[0]
    kw = dict(add_extra_token_to_sequence=False, drop_last_partial_validation_sequence=False)
    sizes = [500, 120, 30]
    theirs = mcore(([prefix], None), sizes, tmp_path, **kw)
    ours = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path, pad_token_id=PAD, **kw))
    for o, t in zip(ours, theirs):
        assert_same_gpt(o, t)
        for i in range(len(t)):
            a, b = o[i], t[i]
            assert a["input_ids"].dtype == torch.int64 and a["input_ids"].shape == (SEQ,)
            np.testing.assert_array_equal(a["input_ids"].numpy(), b["tokens"].numpy())
            np.testing.assert_array_equal(a["loss_mask"].numpy(), b["loss_mask"].numpy())
            np.testing.assert_array_equal(a["position_ids"].numpy(), b["position_ids"].numpy())
    valid = ours[1]
    last = valid.get_tokens(int(np.flatnonzero(np.asarray(valid.shuffle_index) == len(valid) - 1)[0]))
    assert last[-1] == PAD  # the kept partial sample is padded


def test_masks_and_position_ids_match_megatron(corpora, tmp_path):
    prefix = corpora[1]
    kw = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    sizes = [200, 40, 10]
    theirs = mcore(([prefix], None), sizes, tmp_path, seq=32, **kw)
    ours = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path, seq=32, eod_token_id=EOD, **kw))
    for o, t in zip(ours, theirs):
        for i in range(len(t)):
            a, b = o[i], t[i]
            np.testing.assert_array_equal(a["input_ids"][:-1].numpy(), b["tokens"].numpy())
            np.testing.assert_array_equal(a["input_ids"][1:].numpy(), b["labels"].numpy())
            for key in ("loss_mask", "position_ids", "attention_mask"):
                np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    attention, loss, pos = ltor_masks_and_position_ids(np.array([5, 0, 7, 8, 0, 9]), 0, True, True, True)
    np.testing.assert_array_equal(pos, [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(loss, [1, 0, 1, 1, 0, 1])
    assert attention[0, 2, 1] and not attention[0, 3, 2] and attention[0, 5, 4]


# ------------------------------------------------------------------------------------- blends
def assert_same_blend(ours, theirs):
    assert isinstance(ours, BlendedDataset) and isinstance(theirs, MBD.BlendedDataset)
    np.testing.assert_array_equal(ours.dataset_index, theirs.dataset_index)
    np.testing.assert_array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
    assert ours.dataset_index.dtype == theirs.dataset_index.dtype
    assert ours.dataset_sample_index.dtype == theirs.dataset_sample_index.dtype
    for o, t in zip(ours.datasets, theirs.datasets):
        assert o.num_samples == t.num_samples
        assert_same_gpt(o, t)
    for i in range(len(theirs)):
        d, s = int(theirs.dataset_index[i]), int(theirs.dataset_sample_index[i])
        ref = theirs.datasets[d]._query_document_sample_shuffle_indices(s)[0]
        np.testing.assert_array_equal(ours.get_tokens(i), ref)
    sample = ours[0]
    assert sample["dataset_id"] == int(theirs.dataset_index[0])


@pytest.mark.parametrize(
    "which,weights,sizes",
    [
        ([0, 1, 2], [5, 3, 2], [1000, 100, 20]),
        ([0, 1], [0.7, 0.3], [2500, 333, 17]),
        ([2, 0, 1], [1, 1, 1], [777, 50, 9]),
        ([1], [1.0], [300, 30, 3]),  # one weighted file is blended too (with the surplus)
    ],
)
def test_blend_matches_megatron(corpora, tmp_path, which, weights, sizes):
    prefixes = [corpora[i] for i in which]
    theirs = mcore((prefixes, weights), sizes, tmp_path, cache=False)
    ours = build_gpt_datasets((prefixes, weights), sizes, megahf_cfg(tmp_path))
    norm = np.array(weights, float) / np.sum(weights)
    for o, t, size in zip(ours, theirs, sizes):
        assert_same_blend(o, t)
        assert len(o) == sum(source_sizes(norm.tolist(), size)) >= size
        assert [d.num_samples for d in o.datasets] == source_sizes(norm.tolist(), size, 0.005)


def test_blend_weighted_by_length_and_exhaustive_match_megatron(corpora, tmp_path):
    prefixes = corpora[:2]
    for sizes in ([400, 50, 10], [None, None, None]):
        theirs = mcore((prefixes, None), sizes, tmp_path, cache=False)
        ours = build_gpt_datasets((prefixes, None), sizes, megahf_cfg(tmp_path))
        for o, t in zip(ours, theirs):
            assert_same_blend(o, t)


def test_blend_per_split_matches_megatron(corpora, tmp_path):
    bps = [(corpora[:2], [0.6, 0.4]), ([corpora[2]], None), (corpora[1:], [1.0, 3.0])]
    sizes = [600, 100, 40]
    theirs = mcore(None, sizes, tmp_path, cache=False, blend_per_split=bps)
    ours = build_gpt_datasets(None, sizes, megahf_cfg(tmp_path), blend_per_split=bps)
    assert_same_blend(ours[0], theirs[0])
    assert_same_gpt(ours[1], theirs[1])
    assert ours[1].split_name == "valid"
    assert_same_blend(ours[2], theirs[2])


def test_blend_oversampling_is_an_error(corpora, tmp_path):
    cfg = megahf_cfg(tmp_path, cache=False)
    a = GPTDataset(IndexedDataset(corpora[0]), range(0, 100), 10, cfg, "train")
    b = GPTDataset(IndexedDataset(corpora[1]), range(0, 100), 10, cfg, "train")
    with pytest.raises(GPTDatasetError, match="mid_level_dataset_surplus"):
        BlendedDataset([a, b], [0.5, 0.5], len(a) + len(b) + 50)


def test_parse_blend():
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["a"]) == (["a"], None)


# --------------------------------------------------------------------------------------- cache
def test_cache_reuse_and_staleness(corpora, tmp_path):
    prefix = corpora[0]
    sizes = [700, 60, 10]
    first = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path))
    assert not any(d.loaded_from_cache for d in first)
    files = sorted(os.listdir(tmp_path / "megahf_cache"))
    assert len(files) == 12 and not [f for f in files if f.startswith(".")]
    again = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path))
    for a, b in zip(first, again):
        assert b.loaded_from_cache and b.cache_key == a.cache_key
        for i in range(len(a)):
            np.testing.assert_array_equal(a.get_tokens(i), b.get_tokens(i))
    # settings that change the arrays change the key (Megatron-Core's key omits the extra token)
    for change in (dict(seq=SEQ + 1), dict(seed=1), dict(add_extra_token_to_sequence=False)):
        other = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path, **change))
        assert not other[0].loaded_from_cache and other[0].cache_key != first[0].cache_key
    # a description that does not match (hand-edited, or a hash collision) is not trusted
    train = first[0]
    with open(train.cache_paths["description"], "w") as f:
        f.write('{"something": "else"}')
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path))[0]
    assert not rebuilt.loaded_from_cache
    np.testing.assert_array_equal(rebuilt.shuffle_index, train.shuffle_index)
    # arrays of the wrong shape are not trusted either
    np.save(train.cache_paths["sample_index"], np.zeros((3, 2), np.int32))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path))[0]
    assert not rebuilt.loaded_from_cache and len(rebuilt) == len(train)
    assert build_gpt_datasets(prefix, sizes, megahf_cfg(tmp_path))[0].loaded_from_cache


def test_rewritten_corpus_does_not_reuse_the_cache(tmp_path):
    """Megatron-Core keys the cache by path and settings only: a corpus rewritten in place reuses
    stale arrays. megahf's key includes the sequence lengths."""
    prefix = write_corpus(tmp_path / "x", 120, 3)
    cfg = megahf_cfg(tmp_path, split="1")
    a = GPTDataset(IndexedDataset(prefix), range(0, 120), 100, cfg, "train")
    write_corpus(tmp_path / "x", 120, 4)
    b = GPTDataset(IndexedDataset(prefix), range(0, 120), 100, cfg, "train")
    assert not b.loaded_from_cache and b.cache_key != a.cache_key
    theirs = mcore(([prefix], None), [100, None, None], tmp_path / "m", split="1")
    assert_same_gpt(b, theirs[0])


def test_blend_cache(corpora, tmp_path):
    blend = (corpora[:2], [0.5, 0.5])
    a = build_gpt_datasets(blend, [300, 30, 5], megahf_cfg(tmp_path))
    b = build_gpt_datasets(blend, [300, 30, 5], megahf_cfg(tmp_path))
    c = build_gpt_datasets(blend, [301, 30, 5], megahf_cfg(tmp_path))
    assert not a[0].loaded_from_cache and b[0].loaded_from_cache and not c[0].loaded_from_cache
    np.testing.assert_array_equal(a[0].dataset_index, b[0].dataset_index)
    clone = pickle.loads(pickle.dumps(b[0]))
    for i in (0, 5, len(clone) - 1):
        np.testing.assert_array_equal(clone.get_tokens(i), a[0].get_tokens(i))


def test_pickle_for_dataloader_workers(corpora, tmp_path):
    train = build_gpt_datasets(corpora[0], [300, 10, 2], megahf_cfg(tmp_path))[0]
    again = build_gpt_datasets(corpora[0], [300, 10, 2], megahf_cfg(tmp_path))[0]
    for ds in (train, again):  # built in memory, and memory-mapped from the cache
        clone = pickle.loads(pickle.dumps(ds))
        for i in (0, 7, len(ds) - 1):
            np.testing.assert_array_equal(clone.get_tokens(i), ds.get_tokens(i))
    loader = torch.utils.data.DataLoader(again, batch_size=4)
    assert next(iter(loader))["input_ids"].shape == (4, SEQ + 1)


def test_any_reader(corpora, tmp_path):
    """Megatron-Core's reader, and a reader with only sequence_lengths and get()."""

    class Minimal:
        def __init__(self, prefix):
            self._ds = IndexedDataset(prefix)
            self.sequence_lengths = self._ds.sequence_lengths

        def get(self, idx, offset=0, length=None):
            return self._ds.get(idx, offset, length)

    cfg = megahf_cfg(tmp_path, cache=False)
    ref = GPTDataset(IndexedDataset(corpora[0]), range(0, 240), 800, cfg, "train")
    for reader in (MI.IndexedDataset(corpora[0]), Minimal(corpora[0])):
        ds = GPTDataset(reader, range(0, 240), 800, cfg, "train")
        for i in range(len(ref)):
            np.testing.assert_array_equal(ds.get_tokens(i), ref.get_tokens(i))


# -------------------------------------------------------------------------------------- errors
def test_empty_split_is_an_error(corpora, tmp_path):
    """Megatron-Core loops forever here (300 sequences at 969,30,1: the test split rounds to 0)."""
    with pytest.raises(GPTDatasetError, match=r"test split.*empty.*969,30,1") as err:
        build_gpt_datasets(corpora[0], [100, 10, 10], megahf_cfg(tmp_path, split="969,30,1"))
    assert "weight" in str(err.value) and "'969,30,0'" in str(err.value)
    # a weight of 0 simply does not build the split, and asking 0 samples skips it
    ok = build_gpt_datasets(corpora[0], [100, 10, 10], megahf_cfg(tmp_path, split="969,31,0"))
    assert ok[2] is None and ok[1] is not None
    ok = build_gpt_datasets(corpora[0], [100, 10, 0], megahf_cfg(tmp_path, split="969,30,1"))
    assert ok[2] is None


def test_bad_requests_are_errors(corpora, tmp_path):
    indexed = IndexedDataset(corpora[0])
    cfg = megahf_cfg(tmp_path, cache=False)
    for bad in (0, -5):
        with pytest.raises(GPTDatasetError, match="num_samples must be positive"):
            GPTDataset(indexed, range(0, 100), bad, cfg, "train")
    with pytest.raises(GPTDatasetError, match="fewer than one sample"):
        GPTDataset(indexed, range(0, 3), 10, megahf_cfg(tmp_path, seq=100_000, cache=False), "train")
    with pytest.raises(GPTDatasetError, match="seq_length"):
        GPTDatasetConfig(seq_length=1)
    with pytest.raises(GPTDatasetError, match="eod_token_id"):
        GPTDatasetConfig(seq_length=8, eod_mask_loss=True)
    with pytest.raises(GPTDatasetError, match="split_name"):
        GPTDataset(indexed, range(0, 100), 10, cfg, "validation")
    ds = GPTDataset(indexed, range(0, 100), 10, cfg, "train")
    with pytest.raises(IndexError):
        ds.get_tokens(len(ds))


# ------------------------------------------------------------------------- the index builders
def test_sample_index_equals_helpers_cpp():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n_docs = int(rng.integers(1, 80))
        sizes = rng.integers(0 if trial % 3 == 0 else 1, int(rng.integers(2, 400)), n_docs).astype(np.int32)
        sizes[0] += 3  # at least a few tokens
        docs = np.arange(n_docs, dtype=np.int32)
        epochs = int(rng.integers(1, 4))
        doc_index = np.tile(docs, epochs)
        rng.shuffle(doc_index)
        seq = int(rng.integers(2, 300))
        extra, drop = bool(trial % 2), bool((trial // 2) % 2)
        tpe = int(sizes.sum())
        if epochs * tpe - extra < seq and drop:
            continue
        ref = mhelpers.build_sample_idx(sizes, doc_index, seq, epochs, tpe, drop, extra)
        got = build_sample_index(sizes, doc_index, seq, epochs, tpe, drop, extra)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)


def test_blending_indices_equal_helpers_cpp():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(1, 9))
        raw = rng.random(n) ** 3 + 1e-4 if trial % 3 else rng.integers(1, 5, n).astype(float)
        weights = (raw / raw.sum()).tolist()
        size = int(rng.integers(0, 30000))
        a, b = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers_cpp.build_blending_indices(a, b, weights, n, size, False)
        x, y = build_blending_indices(weights, size, block=int(rng.choice([0, 1, 7, 500])))
        np.testing.assert_array_equal(x, a)
        np.testing.assert_array_equal(y, b)
        sizes = rng.integers(1, int(rng.choice([3, 50, 3000])), n).astype(np.int64)
        total = int(sizes.sum())
        a, b = np.zeros(total, np.int16), np.zeros(total, np.int64)
        helpers_cpp.build_exhaustive_blending_indices(a, b, sizes, n)
        x, y = build_exhaustive_blending_indices(sizes)
        np.testing.assert_array_equal(x, a)
        np.testing.assert_array_equal(y, b)
