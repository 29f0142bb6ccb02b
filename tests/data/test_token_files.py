"""`data_path` reads what datatrove's own tokenizer classes write: a `.ds` file of `DocumentTokenizer` (nanotron's
format) and the per-task `_NNNNN_tokens` pairs of `MegatronDocumentTokenizer` (as one dataset, in task order); both
hold the documents `megahf preprocess` writes for the same text, a GPT run's samples drawn from them are the same,
and a damaged or mismatched file is refused when opened."""

import json
import shutil

import numpy as np
import pytest

from required import oracle

oracle("datatrove")

from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer  # noqa: E402
from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer, TokenizedFile  # noqa: E402

from megahf.assets import load_gpt2_tokenizer  # noqa: E402
from megahf.data.blended_dataset import build_gpt_datasets  # noqa: E402
from megahf.data.gpt_dataset import GPTDatasetConfig  # noqa: E402
from megahf.data.indexed_dataset import IndexedDataset, IndexedDatasetError  # noqa: E402
from megahf.data.preprocess import preprocess_corpus  # noqa: E402
from megahf.recipe import DataRecipe, RecipeError  # noqa: E402
from megahf.data.token_files import (DatatroveTokenFile, TokenFileSet, datatrove_files,  # noqa: E402
                                     open_token_data)

TEXTS = ["Hello world. This is megahf.", " caf\u00e9 \u2014 \u65e5\u672c\u8a9e!",
         "Mr. Smith went to Washington.\n\nHe stayed."] + [f"Document number {i} of the corpus." for i in range(45)]


def datatrove_run(pipeline, folder, tasks=1):
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(folder)).run()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same texts through megahf preprocess (--append-eod), datatrove's DocumentTokenizer (one task, unshuffled)
    and its MegatronDocumentTokenizer (three tasks, contiguous parts), each with GPT-2's eos after every document."""
    root = tmp_path_factory.mktemp("written")
    tokenizer_json = str(root / "tokenizer.json")
    load_gpt2_tokenizer().backend_tokenizer.save(tokenizer_json)  # the GPT-2 files shipped with megahf, as one file
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    megahf = preprocess_corpus(str(corpus), str(root / "megahf"), append_eod=True, progress=False).prefixes["text"]
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(TEXTS)]
    datatrove_run([docs, DocumentTokenizer(str(root / "ds"), tokenizer_json, save_filename="dt",
                                           eos_token="<|endoftext|>", shuffle_documents=False)], root / "logs-ds")

    def my_part(data, rank, world_size):  # task r reads the r-th contiguous third
        return iter(docs[len(docs) * rank // world_size: len(docs) * (rank + 1) // world_size])

    datatrove_run([my_part, MegatronDocumentTokenizer(str(root / "megatron"), save_filename="dt",
                                                      tokenizer_name_or_path=tokenizer_json,
                                                      eos_token="<|endoftext|>")], root / "logs-megatron", tasks=3)
    return {"root": root, "corpus": str(corpus), "megahf": megahf, "ds": str(root / "ds" / "dt_00000_unshuffled.ds"),
            "megatron": str(root / "megatron")}


def documents(data):
    di = data.document_indices
    return [np.concatenate([data[j] for j in range(di[i], di[i + 1])]).tolist() for i in range(len(di) - 1)]


def test_a_ds_file_holds_the_documents_megahf_preprocess_writes(written):
    ds = open_token_data(written["ds"])
    assert isinstance(ds, DatatroveTokenFile) and ds.dtype == np.uint16
    expected = documents(IndexedDataset(written["megahf"]))
    assert documents(ds) == expected and len(expected) == len(TEXTS)
    assert ds.get(3, offset=1, length=2).tolist() == expected[3][1:3]


def test_megatron_pairs_of_three_tasks_read_as_one_dataset_in_task_order(written):
    files = datatrove_files(written["megatron"])
    assert [f.rsplit("/", 1)[1] for f in files] == ["dt_00000_tokens", "dt_00001_tokens", "dt_00002_tokens"]
    assert datatrove_files(written["megatron"] + "/dt") == files  # the save_filename prefix names the same set
    data = open_token_data(written["megatron"])
    assert isinstance(data, TokenFileSet) and len(data.files) == 3
    assert documents(data) == documents(IndexedDataset(written["megahf"]))


def test_gpt_samples_are_the_same_from_each_form(written):
    """Megatron's GPT samples (what `data_path` trains on; tests/test_pretrain.py goes through a recipe) drawn from
    datatrove's files equal those drawn from megahf's pair."""
    config = GPTDatasetConfig(seq_length=16, seed=5, split="80,20,0")
    samples = {}
    for form in ("megahf", "ds", "megatron"):
        splits = build_gpt_datasets(([written[form]], None), [40, 8, 0], config)[:2]
        samples[form] = [[split.get_tokens(i).tolist() for i in range(len(split))] for split in splits]
    assert len(samples["megahf"][0]) >= 40
    assert samples["ds"] == samples["megahf"] and samples["megatron"] == samples["megahf"]


def test_a_recipe_takes_each_form_as_data_path(written, tmp_path):
    for form in ("megahf", "ds", "megatron"):
        DataRecipe(data_path=f"30 {written[form]} 70 {written['megahf']}").validate()
    with pytest.raises(RecipeError, match="or a .ds file of datatrove's DocumentTokenizer"):
        DataRecipe(data_path=str(tmp_path / "none.ds")).validate()


def copy_ds(written, tmp_path):
    for suffix in ("", ".index", ".metadata"):
        shutil.copy(written["ds"] + suffix, tmp_path / f"x.ds{suffix}")
    return str(tmp_path / "x.ds")


def test_a_ds_without_metadata_reads_its_width_off_the_sizes(written, tmp_path):
    path = copy_ds(written, tmp_path)
    (tmp_path / "x.ds.metadata").unlink()
    assert documents(DatatroveTokenFile(path)) == documents(DatatroveTokenFile(written["ds"]))


def test_four_byte_tokens(tmp_path):
    """A vocabulary over 65,536 ids: datatrove writes 4 bytes per token (its own TokenizedFile here)."""
    out = TokenizedFile(str(tmp_path), "big.ds", tokenizer_name_or_path="big", save_final_metadata=True, token_size=4)
    out.write([70_000, 1, 2], None)
    out.write([65_536], None)
    out.close()
    data = open_token_data(str(tmp_path / "big.ds"), vocab_size=70_001)
    assert data.dtype == np.uint32 and documents(data) == [[70_000, 1, 2], [65_536]]


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p, "r+b").truncate(10), "the file is truncated"),
    (lambda p: open(p + ".metadata", "w").write("gpt2|2\n7\n7"), "the files come from different runs"),
    (lambda p: open(p + ".index", "r+b").write(np.array([99], "<u8").tobytes()), "must not decrease"),
    (lambda p: open(p + ".index", "ab").write(b"\0\0\0"), "not a whole number"),
    (lambda p: __import__("os").remove(p + ".index"), "save_index=True"),
], ids=["truncated", "metadata", "decreasing", "index-size", "no-index"])
def test_a_damaged_ds_is_refused_when_opened(written, tmp_path, damage, message):
    path = copy_ds(written, tmp_path)
    damage(path)
    with pytest.raises(IndexedDatasetError, match=message):
        open_token_data(path)


def test_data_of_a_smaller_tokenizer_is_refused(written):
    with pytest.raises(IndexedDatasetError, match="holds uint16 tokens .* 128,256 ids: the data was tokenized with "
                                                  "another tokenizer"):
        open_token_data(written["ds"], vocab_size=128_256)


def test_a_folder_of_two_kinds_or_of_nothing_is_refused(written, tmp_path):
    with pytest.raises(IndexedDatasetError, match="a data path may be a prefix P of P.bin/P.idx"):
        open_token_data(str(tmp_path / "nothing"))
    for name in ("dt_00000_tokens.bin", "dt_00000_tokens.idx"):
        shutil.copy(f"{written['megatron']}/{name}", tmp_path / name)
    copy_ds(written, tmp_path)
    with pytest.raises(IndexedDatasetError, match="both .ds files and Megatron _tokens pairs"):
        open_token_data(str(tmp_path))
