"""Fine-tuning data: the shipped fixtures load and pass every task's checks; bad data is refused before anything
computes, with the split, column, row and value named; batches and prediction files have their documented form."""

import os
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from megahf.assets import load_bert_tokenizer
from megahf.tasks.finetuning import FIXTURES, TASKS, TaskDataError, fixture_path, get_task
from megahf.tasks.race import race_level

datasets.disable_progress_bars()

GLUE_TASKS = [name for name in TASKS if name != "race"]
#: Per task and class, the cue words the fixture generator puts into every text of that class.
CUES = {"sst2": (("terrible", "awful"), ("wonderful", "great")), "mnli": (("definitely",), ("perhaps",), ("never",
                                                                                                             "nobody"))}


@pytest.fixture(scope="module")
def bert():
    return load_bert_tokenizer()


@pytest.fixture(scope="module")
def loaded():
    return {name: task.load(fixture_path(name)) for name, task in TASKS.items()}


def copy_fixture(tmp_path, task_name):
    folder = tmp_path / task_name
    shutil.copytree(fixture_path(task_name), folder)
    return folder


def rewrite(path, change):
    """Rewrite a parquet split file through `change(dataset) -> dataset`."""
    dataset = datasets.Dataset.from_parquet(str(path))
    changed = change(dataset)
    os.unlink(path)
    changed.to_parquet(str(path))


def test_every_task_loads_its_fixture_with_all_splits(loaded):
    for name, task in TASKS.items():
        splits = loaded[name]
        assert list(splits) == [task.train_split, *task.eval_splits, *task.test_splits]
        assert len(splits[task.train_split]) == 64
        assert all(len(splits[s]) == 32 for s in task.eval_splits)
        assert all(len(splits[s]) == 16 for s in task.test_splits)
        assert FIXTURES[name] == fixture_path(name)


def test_fixtures_load_with_datasets_like_the_hub_dataset():
    for name, task in TASKS.items():
        split = datasets.load_dataset(str(fixture_path(name)), task.hub_config, split=task.eval_splits[0])
        assert set(task.columns) <= set(split.column_names)
    for config in ("high", "middle"):
        race = get_task("race", config).load(fixture_path("race"))
        levels = {race_level(example_id) for example_id in race["validation"]["example_id"]}
        assert levels == {config}


def test_glue_fixtures_keep_the_hub_features(loaded):
    for name in GLUE_TASKS:
        task = TASKS[name]
        features = loaded[name][task.train_split].features
        if task.is_regression:
            assert features["label"] == datasets.Value("float32")
        else:
            assert features["label"] == datasets.ClassLabel(names=list(task.label_names))
        assert features["idx"] == datasets.Value("int32")
        for split in task.test_splits:
            assert set(loaded[name][split]["label"]) == {-1}


def test_fixture_classes_are_balanced_and_carry_their_cues(loaded):
    for name in GLUE_TASKS:
        task = TASKS[name]
        if task.is_regression:
            continue
        for split in (task.train_split, *task.eval_splits):
            counts = np.bincount(loaded[name][split]["label"], minlength=task.num_labels)
            assert counts.min() >= len(loaded[name][split]) // task.num_labels - 1, (name, split, counts)
    for name, cues in CUES.items():
        task = TASKS[name]
        split = loaded[name][task.train_split]
        for row in split:
            text = " ".join(row[c] for c in task.text_columns).split()
            assert any(cue in text for cue in cues[row["label"]]), row
            assert not any(cue in text for other, words in enumerate(cues) if other != row["label"] for cue in words)


def test_race_fixture_right_option_is_in_the_article_and_no_wrong_one_is(loaded):
    for split in ("train", "validation", "test"):
        for row in loaded["race"][split]:
            article = row["article"].split()
            right = "ABCD".index(row["answer"])
            assert row["options"][right] in article
            assert not any(o in article for i, o in enumerate(row["options"]) if i != right)


def test_featurize_and_collate_shapes_of_every_task(loaded, bert):
    for name, task in TASKS.items():
        features = task.featurize(loaded[name][task.eval_splits[0]], bert, 32)
        assert task.id_column in features.column_names
        batch = task.collate([features[i] for i in range(5)], bert.pad_token_id)
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        width = max(len(ids) for i in range(5) for ids in
                    (features[i]["input_ids"] if name == "race" else [features[i]["input_ids"]]))
        shape = (5, 4, width) if name == "race" else (5, width)
        assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == shape
        assert batch["labels"].shape == (5,)
        assert batch["labels"].dtype == (torch.float32 if task.is_regression else torch.int64)
        assert width <= 32


def test_collate_pads_right_with_the_pad_id(bert):
    task = get_task("sst2")
    rows = [{"input_ids": [101, 7, 102], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1], "labels": 1,
             "idx": 0},
            {"input_ids": [101, 102], "token_type_ids": [0, 0], "attention_mask": [1, 1], "labels": 0, "idx": 1}]
    batch = task.collate(rows, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    race = get_task("race")
    row = {"input_ids": [[1, 2], [1], [1, 2, 3], [1]], "token_type_ids": [[0, 1], [0], [0, 1, 1], [0]],
           "attention_mask": [[1, 1], [1], [1, 1, 1], [1]], "labels": 2, "example_id": "high1.txt"}
    batch = race.collate([row, row], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 4, 3)
    assert batch["input_ids"][0, 1].tolist() == [1, 0, 0]
    assert batch["token_type_ids"][1, 2].tolist() == [0, 1, 1]


def test_stsb_labels_are_floats_and_test_labels_minus_one(loaded, bert):
    task = get_task("stsb")
    train = task.featurize(loaded["stsb"]["train"], bert, 32)
    assert train.features["labels"] == datasets.Value("float32")
    assert train["labels"] == pytest.approx(loaded["stsb"]["train"]["label"])
    test = get_task("sst2").featurize(loaded["sst2"]["test"], bert, 32)
    assert set(test["labels"]) == {-1}


def test_write_predictions_glue_formats(tmp_path, loaded):
    mnli = get_task("mnli")
    split = loaded["mnli"]["test_matched"]
    path = tmp_path / mnli.prediction_file_name("test_matched")
    mnli.write_predictions(path, split, np.arange(16) % 3)
    lines = path.read_text().splitlines()
    assert path.name == "MNLI-m.tsv"
    assert lines[0] == "index\tprediction"
    assert lines[1:4] == ["0\tentailment", "1\tneutral", "2\tcontradiction"]
    assert len(lines) == 17
    assert sorted(os.listdir(tmp_path)) == ["MNLI-m.tsv"]  # written atomically: no temporary file left

    sst2 = get_task("sst2")
    sst2.write_predictions(tmp_path / "SST-2.tsv", loaded["sst2"]["test"], np.ones(16, dtype=int))
    assert (tmp_path / "SST-2.tsv").read_text().splitlines()[1] == "0\t1"

    stsb = get_task("stsb")
    stsb.write_predictions(tmp_path / "STS-B.tsv", loaded["stsb"]["test"], np.linspace(0, 5, 16))
    lines = (tmp_path / "STS-B.tsv").read_text().splitlines()
    assert lines[1] == "0\t0.000000" and lines[16] == "15\t5.000000"
    assert float(lines[2].split("\t")[1]) == pytest.approx(5 / 15, abs=1e-6)  # 6 decimals written


def test_prediction_file_names():
    names = {name: [task.prediction_file_name(s) for s in task.test_splits] for name, task in TASKS.items()}
    assert names == {"cola": ["CoLA.tsv"], "sst2": ["SST-2.tsv"], "mrpc": ["MRPC.tsv"], "qqp": ["QQP.tsv"],
                     "stsb": ["STS-B.tsv"], "mnli": ["MNLI-m.tsv", "MNLI-mm.tsv"], "qnli": ["QNLI.tsv"],
                     "rte": ["RTE.tsv"], "wnli": ["WNLI.tsv"], "race": ["race_test.tsv"]}


def test_write_predictions_race_letters(tmp_path, loaded):
    race = get_task("race")
    race.write_predictions(tmp_path / "race_test.tsv", loaded["race"]["test"], np.arange(16) % 4)
    lines = (tmp_path / "race_test.tsv").read_text().splitlines()
    assert lines[:3] == ["index\tprediction", "0\tA", "1\tB"]


def test_write_predictions_refuses_wrong_count(tmp_path, loaded):
    with pytest.raises(TaskDataError, match="16 rows"):
        get_task("rte").write_predictions(tmp_path / "RTE.tsv", loaded["rte"]["test"], np.zeros(3))
    assert not (tmp_path / "RTE.tsv").exists()


# --- errors, before any compute -------------------------------------------------------------------------------------

def test_unknown_task_names_the_known_ones():
    with pytest.raises(TaskDataError, match="'squad'.*known tasks: cola, sst2, mrpc.*race"):
        get_task("squad")
    with pytest.raises(TaskDataError, match="no config 'college'.*all, high, middle"):
        get_task("race", "college")


def test_missing_folder(tmp_path):
    with pytest.raises(TaskDataError, match="no-such-folder: no such folder.*nyu-mll/glue"):
        get_task("cola").load(tmp_path / "no-such-folder")


def test_folder_not_laid_out_like_the_hub(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("x\n")
    with pytest.raises(TaskDataError, match="not laid out like nyu-mll/glue: it has no mnli/ folder"):
        get_task("mnli").load(tmp_path / "data")


def test_missing_split(tmp_path):
    folder = copy_fixture(tmp_path, "qnli")
    os.unlink(folder / "qnli" / "validation-00000-of-00001.parquet")
    with pytest.raises(TaskDataError, match=f"{folder}: no split 'validation' for task qnli.*splits found: test, "
                                            "train"):
        get_task("qnli").load(folder)
    assert list(get_task("qnli").load(folder, splits=["train"])) == ["train"]  # asking fewer splits works


def test_missing_column(tmp_path):
    folder = copy_fixture(tmp_path, "sst2")
    rewrite(folder / "sst2" / "train-00000-of-00001.parquet", lambda d: d.rename_column("sentence", "text"))
    with pytest.raises(TaskDataError, match="split 'train' has no column 'sentence'"):
        get_task("sst2").load(folder)


def test_label_outside_the_classes(tmp_path):
    folder = copy_fixture(tmp_path, "sst2")

    def bad_label(dataset):
        labels = list(dataset["label"])
        labels[5] = 7
        return dataset.remove_columns("label").add_column("label", labels)  # plain int64, as a user's data may be

    rewrite(folder / "sst2" / "validation-00000-of-00001.parquet", bad_label)
    with pytest.raises(TaskDataError, match="split 'validation' row 5: label 7 is not one of task sst2's classes "
                                            "0=negative, 1=positive"):
        get_task("sst2").load(folder)


def test_unlabeled_rows_only_in_test_splits(tmp_path):
    folder = copy_fixture(tmp_path, "cola")
    shutil.copy(folder / "cola" / "test-00000-of-00001.parquet", folder / "cola" / "train-00000-of-00001.parquet")
    with pytest.raises(TaskDataError, match="split 'train' row 0: label -1 .*only in the test splits"):
        get_task("cola").load(folder)


def test_classes_in_another_order_are_refused(tmp_path):
    folder = copy_fixture(tmp_path, "mnli")
    megatron_order = datasets.ClassLabel(names=["contradiction", "entailment", "neutral"])
    rewrite(folder / "mnli" / "train-00000-of-00001.parquet", lambda d: d.cast_column("label", megatron_order))
    with pytest.raises(TaskDataError, match=r"classes \['contradiction', 'entailment', 'neutral'\].*relabel"):
        get_task("mnli").load(folder)


def test_stsb_score_out_of_range(tmp_path):
    folder = copy_fixture(tmp_path, "stsb")
    rewrite(folder / "stsb" / "train-00000-of-00001.parquet",
            lambda d: d.map(lambda row, i: {"label": 9.5 if i == 3 else row["label"]}, with_indices=True))
    with pytest.raises(TaskDataError, match="split 'train' row 3: label 9.5 is not an STS-B similarity score"):
        get_task("stsb").load(folder)


def test_null_text_is_refused(tmp_path):
    folder = copy_fixture(tmp_path, "rte")
    rewrite(folder / "rte" / "test-00000-of-00001.parquet",
            lambda d: d.map(lambda row, i: {"sentence2": None if i == 2 else row["sentence2"]}, with_indices=True))
    with pytest.raises(TaskDataError, match="split 'test' row 2: column 'sentence2' is empty"):
        get_task("rte").load(folder)


def test_race_bad_answer_and_options(tmp_path):
    folder = copy_fixture(tmp_path, "race")
    path = folder / "all" / "train-00000-of-00001.parquet"
    original = pq.read_table(path)
    rewrite(path, lambda d: d.map(lambda row, i: {"answer": "E" if i == 4 else row["answer"]}, with_indices=True))
    with pytest.raises(TaskDataError, match="split 'train' row 4: answer 'E' is not one of A, B, C, D"):
        get_task("race").load(folder)
    pq.write_table(original, path)
    rewrite(path, lambda d: d.map(lambda row, i: {"options": row["options"][:3] if i == 1 else row["options"]},
                                  with_indices=True))
    with pytest.raises(TaskDataError, match="split 'train' row 1: 'options' is .* not a list of 4 strings"):
        get_task("race").load(folder)


def test_race_eval_ids_must_tell_the_level(tmp_path):
    folder = copy_fixture(tmp_path, "race")
    rewrite(folder / "all" / "validation-00000-of-00001.parquet",
            lambda d: d.map(lambda row: {"example_id": row["example_id"].replace("middle", "college")}))
    with pytest.raises(TaskDataError, match="split 'validation' row .*: example_id 'college.*level"):
        get_task("race").load(folder)


def test_featurize_refuses_tiny_max_seq_length(loaded, bert):
    with pytest.raises(TaskDataError, match="max_seq_length 4: too short.*at least 8"):
        get_task("sst2").featurize(loaded["sst2"]["train"], bert, 4)


def test_damaged_parquet_file(tmp_path):
    folder = copy_fixture(tmp_path, "wnli")
    (folder / "wnli" / "validation-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(TaskDataError, match="cannot read split 'validation'.*intact parquet files"):
        get_task("wnli").load(folder)


def test_hub_dataset_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskDataError, match="cannot load nyu-mll/glue \\(sst2\\).*offline, set `dataset` to a local "
                                            "folder"):
        get_task("sst2").load(None)
