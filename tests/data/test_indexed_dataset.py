"""megahf's indexed dataset against Megatron-Core 0.16.1's (the test-only oracle, see
scripts/requirements-test.txt): same bytes written, same sequences read both ways, and clear
errors on every kind of broken file."""

import filecmp
import gc
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from required import oracle
from megahf.data.indexed_dataset import (
    DTYPE_CODES,
    INDEX_MAGIC,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    M = oracle("megatron.core.datasets.indexed_dataset")


def random_docs(seed, n_docs=12, vocab=50257, max_len=40):
    """A list of documents, each a list of sequences (some empty), as int64 arrays."""
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, vocab, rng.integers(0, max_len)) for _ in range(rng.integers(1, 4))]
        for _ in range(n_docs)
    ]


def write_megahf(prefix, docs, dtype, by_document=False):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        if by_document:
            b.add_document(np.concatenate(doc), [len(s) for s in doc])
        else:
            for s in doc:
                b.add_item(s)
            b.end_document()
    b.finalize(f"{prefix}.idx")


def write_megatron(prefix, docs, dtype, by_document=False):
    b = M.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        if by_document:
            b.add_document(torch.from_numpy(np.concatenate(doc)), [len(s) for s in doc])
        else:
            for s in doc:
                b.add_item(torch.from_numpy(s))
            b.end_document()
    b.finalize(f"{prefix}.idx")


def same_files(a, b):
    return all(filecmp.cmp(f"{a}{ext}", f"{b}{ext}", shallow=False) for ext in (".bin", ".idx"))


def assert_same_content(ours, theirs):
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    assert ours.dtype == theirs.index.dtype
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs[i])
        assert ours[i].dtype == theirs[i].dtype
    for a, b in zip(ours[2:7], theirs[2:7]):
        np.testing.assert_array_equal(a, b)
    for i in range(len(ours)):
        n = int(ours.sequence_lengths[i])
        if n >= 3:
            np.testing.assert_array_equal(ours.get(i, 1, n - 2), theirs.get(i, 1, n - 2))
            np.testing.assert_array_equal(ours.get(i, 2), theirs.get(i, 2))


# ----------------------------------------------------------------------------- the format itself
def test_dtype_codes_and_best_dtype_match_megatron():
    for code, dt in DTYPE_CODES.items():
        assert np.dtype(M.DType.dtype_from_code(code)) == dt
    for vocab in (None, 0, 256, 30522, 50257, 65499, 65500, 65536, 128256):
        assert best_dtype(vocab) == np.dtype(M.DType.optimal_dtype(vocab)), vocab


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("by_document", [False, True], ids=["add_item", "add_document"])
def test_bytes_identical_to_megatron(tmp_path, dtype, by_document):
    docs = random_docs(0)
    write_megahf(tmp_path / "ours", docs, dtype, by_document)
    write_megatron(tmp_path / "theirs", docs, dtype, by_document)
    assert same_files(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_merge_bytes_identical_to_megatron(tmp_path, dtype):
    write_megahf(tmp_path / "a", random_docs(1), dtype)
    write_megahf(tmp_path / "b", random_docs(2), dtype)
    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=dtype)
    theirs = M.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for b in (ours, theirs):
        b.add_index(str(tmp_path / "a"))
        b.add_index(str(tmp_path / "b"))
        b.add_item(torch.tensor([1, 2, 3]))
        b.end_document()
    ours.finalize(tmp_path / "ours.idx")
    theirs.finalize(str(tmp_path / "theirs.idx"))
    assert same_files(tmp_path / "ours", tmp_path / "theirs")
    merged = IndexedDataset(tmp_path / "ours")
    assert merged.num_documents == 12 + 12 + 1
    np.testing.assert_array_equal(merged[-1], [1, 2, 3])


def test_modes_bytes_identical_to_megatron(tmp_path):
    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=np.uint16, multimodal=True)
    theirs = M.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16, multimodal=True)
    for b in (ours, theirs):
        b.add_item(torch.tensor([5, 6]), mode=0)
        b.add_item(torch.tensor([7]), mode=1)
        b.end_document()
    ours.finalize(tmp_path / "ours.idx")
    theirs.finalize(str(tmp_path / "theirs.idx"))
    assert same_files(tmp_path / "ours", tmp_path / "theirs")
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "ours").sequence_modes, [0, 1])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_what_megahf_writes(tmp_path, dtype):
    write_megahf(tmp_path / "ours", random_docs(3, vocab=60000 if dtype == np.uint16 else 200000), dtype)
    assert_same_content(IndexedDataset(tmp_path / "ours"), M.IndexedDataset(str(tmp_path / "ours")))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megahf_reads_what_megatron_writes(tmp_path, dtype):
    write_megatron(tmp_path / "theirs", random_docs(4), dtype, by_document=True)
    assert_same_content(IndexedDataset(tmp_path / "theirs"), M.IndexedDataset(str(tmp_path / "theirs")))


def test_reader_api(tmp_path):
    write_megahf(tmp_path / "d", [[np.array([1, 2, 3]), np.array([4])], [np.array([5, 6, 7, 8])]], np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 8
    np.testing.assert_array_equal(ds.tokens, [1, 2, 3, 4, 5, 6, 7, 8])
    assert ds.dtype == np.uint16
    np.testing.assert_array_equal(ds.sequence_lengths, [3, 1, 4])
    np.testing.assert_array_equal(ds.sequence_pointers, [0, 6, 8])
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3])
    assert ds.sequence_modes is None
    np.testing.assert_array_equal(ds[-1], [5, 6, 7, 8])
    np.testing.assert_array_equal(ds[np.int64(1)], [4])
    np.testing.assert_array_equal(ds.get(2, offset=1, length=2), [6, 7])
    np.testing.assert_array_equal(ds.get(2, offset=4), [])
    assert [a.tolist() for a in ds[0:2]] == [[1, 2, 3], [4]]
    assert [a.tolist() for a in ds] == [[1, 2, 3], [4], [5, 6, 7, 8]]
    assert not ds[0].flags.writeable
    with pytest.raises(IndexError, match="3 sequences"):
        ds[3]
    with pytest.raises(IndexError, match="4 tokens"):
        ds.get(2, offset=3, length=2)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:3:2]
    with pytest.raises(TypeError):
        ds[1.0]
    assert IndexedDataset.exists(tmp_path / "d") and not IndexedDataset.exists(tmp_path / "e")
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again[2], ds[2])


def test_empty_dataset_round_trip(tmp_path):
    IndexedDatasetBuilder(tmp_path / "e.bin", dtype=np.uint16).finalize(tmp_path / "e.idx")
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds[0:5] == []


def test_views_outlive_the_dataset(tmp_path):
    """Megatron-Core closes its memory map in __del__, so a view kept longer segfaults; ours must not."""
    docs = random_docs(5)
    write_megahf(tmp_path / "d", docs, np.uint16)
    ds = IndexedDataset(tmp_path / "d")
    expected = [ds[i].copy() for i in range(len(ds))]
    one, many, part, lengths = ds[0], ds[1:4], ds.get(4, 1), ds.sequence_lengths
    ds.close()
    del ds
    gc.collect()
    np.testing.assert_array_equal(one, expected[0])
    for a, b in zip(many, expected[1:4]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(part, expected[4][1:])
    assert int(lengths.sum()) == sum(len(e) for e in expected)
    assert int(one.sum()) == int(expected[0].sum())  # touch the memory once more after gc


# ----------------------------------------------------------------------------- writing safely
def test_builder_writes_under_temporary_names_until_finalize(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "d.bin", dtype=np.uint16)
    b.add_item([1, 2])
    b.end_document()
    assert not (tmp_path / "d.bin").exists() and not IndexedDataset.exists(tmp_path / "d")
    assert all(name.startswith(".d.bin.tmp") for name in os.listdir(tmp_path))
    b.finalize(tmp_path / "d.idx")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_builder_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "d.bin", dtype=np.uint16) as b:
            b.add_item([1, 2])
            raise RuntimeError("interrupted")
    b = IndexedDatasetBuilder(tmp_path / "e.bin", dtype=np.uint16)
    b.add_item([1])
    b.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad,dtype", [(70000, np.uint16), (-1, np.uint16), (2**31, np.int32)])
def test_token_that_does_not_fit_the_dtype(tmp_path, bad, dtype):
    b = IndexedDatasetBuilder(tmp_path / "d.bin", dtype=dtype)
    with pytest.raises(IndexedDatasetError) as e:
        b.add_item(np.array([1, bad], dtype=np.int64))
    msg = str(e.value)
    assert str(bad) in msg and np.dtype(dtype).name in msg and "d.bin" in msg and "dtype=" in msg
    b.abort()


def test_merge_refuses_another_dtype(tmp_path):
    write_megahf(tmp_path / "a", random_docs(6), np.int32)
    b = IndexedDatasetBuilder(tmp_path / "m.bin", dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"a\.idx.*int32.*uint16"):
        b.add_index(tmp_path / "a")
    b.abort()


# ----------------------------------------------------------------------------- broken files
@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "good"
    write_megahf(prefix, random_docs(7), np.uint16)
    return prefix


def rewrite(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def test_missing_files(tmp_path, good):
    with pytest.raises(FileNotFoundError, match="nothing.idx") as e:
        IndexedDataset(tmp_path / "nothing")
    assert "nothing.bin" in str(e.value)
    with pytest.raises(FileNotFoundError, match="without the '.bin' suffix"):
        IndexedDataset(str(good) + ".bin")
    os.remove(f"{good}.bin")
    with pytest.raises(FileNotFoundError, match="good.bin"):
        IndexedDataset(good)


def test_prefix_hint_for_preprocess_names(tmp_path):
    write_megahf(tmp_path / "my_text_document", random_docs(8), np.uint16)
    with pytest.raises(FileNotFoundError, match="my_text_document"):
        IndexedDataset(tmp_path / "my")


def _set_dtype_code(d):
    d[17] = 99
    return d


def _set_version(d):
    d[9:17] = struct.pack("<Q", 2)
    return d


@pytest.mark.parametrize(
    "corrupt,pattern",
    [
        (lambda d: b"NOTMEGA!!" + d[9:], "not a Megatron index file"),
        (_set_version, "unsupported index version 2"),
        (_set_dtype_code, "unknown dtype code 99"),
        (lambda d: d[:-5], "truncated index file"),
        (lambda d: d[:20], "truncated index file"),
        (lambda d: d + b"\0" * 3, "trailing bytes"),
    ],
    ids=["magic", "version", "dtype", "truncated", "header-only", "trailing"],
)
def test_corrupt_index(good, corrupt, pattern):
    rewrite(good.with_suffix(".idx"), corrupt)
    with pytest.raises(IndexedDatasetError, match=pattern) as e:
        IndexedDataset(good)
    assert "good.idx" in str(e.value)


@pytest.mark.parametrize("change,word", [(lambda d: d[:-4], "truncated"), (lambda d: d + b"\0\0", "longer")])
def test_bin_size_does_not_match_index(good, change, word):
    rewrite(good.with_suffix(".bin"), change)
    with pytest.raises(IndexedDatasetError, match=word) as e:
        IndexedDataset(good)
    assert "good.bin" in str(e.value) and "good.idx" in str(e.value)


def test_megatron_magic_is_what_we_write(good):
    assert good.with_suffix(".idx").read_bytes()[:9] == INDEX_MAGIC == M._INDEX_HEADER


# ----------------------------------------------------------------------------- every pointer and document index
def index_arrays_of(data):
    """(sequence count, document-index count, byte offsets of the lengths, the pointers, the document indices)."""
    n, d = struct.unpack_from("<QQ", bytes(data), 18)
    return n, d, 34, 34 + 4 * n, 34 + 12 * n


def index_arrays(idx):
    return index_arrays_of(idx.read_bytes())


def shift_pointers(data, first, last, by):
    """Add `by` bytes to sequence pointers [first, last) of an index held in `data`."""
    n, _ = struct.unpack_from("<QQ", data, 18)
    pointers = np.frombuffer(bytes(data), dtype="<i8", count=n, offset=34 + 4 * n).copy()
    pointers[first:last] += by
    data[34 + 4 * n : 34 + 12 * n] = pointers.astype("<i8").tobytes()
    return data


def test_pointers_corrupted_in_the_middle_fail_at_open(tmp_path):
    """The issue's case: +2 on pointers[1..n-2] of a `megahf preprocess` output used to read 58 of 60 sequences
    shifted by one token."""
    from megahf.data.preprocess import preprocess_corpus

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "document number {i} of the corpus"}}\n' for i in range(60)))
    prefix = preprocess_corpus(str(corpus), str(tmp_path / "p"), tokenizer="gpt2", append_eod=True).prefixes["text"]
    idx = tmp_path / "p_text_document.idx"
    n = index_arrays(idx)[0]
    assert n == 60
    rewrite(idx, lambda d: shift_pointers(d, 1, n - 1, 2))
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    message = str(e.value)
    assert "p_text_document.idx" in message and "58 of 60 sequence pointers" in message
    assert "sequence 1" in message and "megahf preprocess" in message


def test_pointer_past_the_end_of_the_bin_fails_at_open(good):
    n = index_arrays(good.with_suffix(".idx"))[0]
    rewrite(good.with_suffix(".idx"), lambda d: shift_pointers(d, n - 1, n, 10**9))
    with pytest.raises(IndexedDatasetError, match=rf"sequence {n - 1}, which points at byte \d+, past the end"):
        IndexedDataset(good)


def test_every_pointer_is_checked_whatever_the_chunk(good, monkeypatch):
    """The check runs over bounded chunks: a bad pointer in a later chunk is found, a good index still opens."""
    import megahf.data.indexed_dataset as indexed

    monkeypatch.setattr(indexed, "_CHECK_CHUNK", 3)
    expected = [s.copy() for s in IndexedDataset(good)]
    n = index_arrays(good.with_suffix(".idx"))[0]
    assert n > 10
    rewrite(good.with_suffix(".idx"), lambda d: shift_pointers(d, n - 2, n - 1, 2))
    with pytest.raises(IndexedDatasetError, match=rf"1 of {n} sequence pointers .* sequence {n - 2},"):
        IndexedDataset(good)
    rewrite(good.with_suffix(".idx"), lambda d: shift_pointers(d, n - 2, n - 1, -2))
    assert [s.tolist() for s in IndexedDataset(good)] == [s.tolist() for s in expected]


def test_negative_length_fails_at_open(good):
    def negative(d):
        d[34 + 4 : 34 + 8] = struct.pack("<i", -3)
        return d

    rewrite(good.with_suffix(".idx"), negative)
    with pytest.raises(IndexedDatasetError, match="sequence 1 has length -3") as e:
        IndexedDataset(good)
    assert "good.idx" in str(e.value)


@pytest.mark.parametrize("where,value,pattern", [
    (2, 0, "document index 2 is 0, smaller than the one before it"),
    (-1, 5, "document indices run from 0 to 5"),
    (0, 1, "document indices run from 1"),
], ids=["decreasing", "last", "first"])
def test_bad_document_indices_fail_at_open(good, where, value, pattern):
    def set_doc(d):
        n, count, _, _, docs_at = index_arrays_of(d)
        i = where % count
        d[docs_at + 8 * i : docs_at + 8 * i + 8] = struct.pack("<q", value)
        return d

    rewrite(good.with_suffix(".idx"), set_doc)
    with pytest.raises(IndexedDatasetError, match=pattern) as e:
        IndexedDataset(good)
    assert "good.idx" in str(e.value)


def test_idx_and_bin_of_different_datasets_fail_at_open(tmp_path, good):
    other = tmp_path / "other"
    write_megahf(other, random_docs(8), np.uint16)
    assert good.with_suffix(".bin").stat().st_size != other.with_suffix(".bin").stat().st_size
    os.replace(other.with_suffix(".bin"), good.with_suffix(".bin"))
    with pytest.raises(IndexedDatasetError, match="different datasets") as e:
        IndexedDataset(good)
    assert "good.bin" in str(e.value) and "good.idx" in str(e.value)


def test_errors_are_megahf_errors_and_keep_their_builtin_bases(tmp_path):
    from megahf.errors import MegahfError

    assert issubclass(IndexedDatasetError, MegahfError) and issubclass(IndexedDatasetError, ValueError)
    with pytest.raises(MegahfError) as e:
        IndexedDataset(tmp_path / "nothing")
    assert isinstance(e.value, FileNotFoundError)
