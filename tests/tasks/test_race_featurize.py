"""RACE featurization, as Megatron-LM's tasks/race/data.py builds it, against sequences written out by hand; and the
GLUE pair building it shares (tasks/data_utils.py)."""

import datasets
import pytest

from megahf.assets import load_bert_tokenizer
from megahf.tasks.finetuning import TaskDataError, get_task
from megahf.tasks.glue import build_pair, clean_text
from megahf.tasks.race import MAX_QA_LENGTH, question_with_option, race_level

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def bert():
    return load_bert_tokenizer()


def race_rows(**columns):
    row = {"example_id": "middle1.txt", "article": "the cat sat on the mat .", "answer": "A",
           "question": "where did the cat sit ?", "options": ["mat", "hat", "box", "bed"]}
    row.update(columns)
    features = datasets.Features({"example_id": datasets.Value("string"), "article": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({k: [v] for k, v in row.items()}, features=features)


def ids(bert, words):
    """Vocabulary ids of tokens written out by hand (each one vocabulary entry)."""
    found = bert.convert_tokens_to_ids(words)
    assert bert.unk_token_id not in found, words
    return found


def featurize(bert, max_seq_length=64, **columns):
    return get_task("race").featurize(race_rows(**columns), bert, max_seq_length)[0]


def test_question_with_blank_has_it_replaced_by_each_option(bert):
    row = featurize(bert, question="the cat sat on the _ .", answer="C")
    article = ["the", "cat", "sat", "on", "the", "mat", "."]
    for option, ids_of_choice in zip(["mat", "hat", "box", "bed"], row["input_ids"]):
        expected = ["[CLS]", "the", "cat", "sat", "on", "the", option, ".", "[SEP]", *article, "[SEP]"]
        assert ids_of_choice == ids(bert, expected)
    assert row["labels"] == 2  # ord("C") - ord("A")
    assert row["example_id"] == "middle1.txt"


def test_every_blank_is_replaced(bert):
    assert question_with_option("_ and _ met", "tom") == "tom and tom met"


def test_question_without_blank_has_the_option_appended(bert):
    row = featurize(bert, question="where did the cat sit ?", answer="D")
    expected = ["[CLS]", "where", "did", "the", "cat", "sit", "?", "bed", "[SEP]",
                "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert row["input_ids"][3] == ids(bert, expected)
    # token types: 0 for [CLS] question+option [SEP], 1 for article [SEP]
    assert row["token_type_ids"][3] == [0] * 9 + [1] * 8
    assert row["attention_mask"][3] == [1] * 17
    assert row["labels"] == 3


def test_question_and_option_are_capped_at_128_tokens(bert):
    # 150 question tokens + the appended option: only the first 128 stay, so the option itself is cut off
    row = featurize(bert, max_seq_length=512, question=" ".join(["word"] * 150))
    article = ids(bert, ["the", "cat", "sat", "on", "the", "mat", "."])
    expected = [CLS, *ids(bert, ["word"] * MAX_QA_LENGTH), SEP, *article, SEP]
    assert MAX_QA_LENGTH == 128
    for choice in range(4):
        assert row["input_ids"][choice] == expected
        assert row["token_type_ids"][choice] == [0] * 130 + [1] * 8


def test_article_is_truncated_to_max_length_and_ends_with_sep(bert):
    article = " ".join(["dog"] * 20)
    row = featurize(bert, max_seq_length=12, article=article, question="what is it ?", options=["red", "a", "b", "c"])
    # [CLS] what is it ? red [SEP] = 7 tokens; the article keeps 4 so that the last [SEP] makes 12
    expected = ["[CLS]", "what", "is", "it", "?", "red", "[SEP]", "dog", "dog", "dog", "dog", "[SEP]"]
    assert row["input_ids"][0] == ids(bert, expected)
    assert row["token_type_ids"][0] == [0] * 7 + [1] * 5
    assert all(len(choice) == 12 for choice in row["input_ids"])


def test_text_is_cleaned_as_megatron_does(bert):
    assert clean_text("one\ntwo   three . four .  five") == "one two three. four. five"
    row = featurize(bert, article="the  cat\nsat .", question="who sat ?")
    assert row["input_ids"][0][-5:] == ids(bert, ["the", "cat", "sat", ".", "[SEP]"])


def test_unlabeled_row_gets_label_minus_one(bert):
    assert featurize(bert, answer="")["labels"] == -1


def test_row_with_three_options_is_refused(bert):
    with pytest.raises(TaskDataError, match="3 options"):
        featurize(bert, options=["a", "b", "c"])


def test_levels_come_from_the_example_id_prefix():
    assert race_level("high1234.txt") == "high"
    assert race_level("middle567.txt") == "middle"
    assert race_level("college1.txt") is None
    assert race_level(None) is None


def test_glue_pair_golden(bert):
    task = get_task("mrpc")
    rows = datasets.Dataset.from_dict({"sentence1": ["the cat sat ."], "sentence2": ["a dog ran away ."],
                                       "label": [1], "idx": [7]})
    row = task.featurize(rows, bert, 64)[0]
    expected = ["[CLS]", "the", "cat", "sat", ".", "[SEP]", "a", "dog", "ran", "away", ".", "[SEP]"]
    assert row["input_ids"] == ids(bert, expected)
    assert row["token_type_ids"] == [0] * 6 + [1] * 6
    assert row["attention_mask"] == [1] * 12
    assert (row["labels"], row["idx"]) == (1, 7)


def test_glue_pair_is_cut_at_the_tail_as_megatron_does(bert):
    task = get_task("rte")
    rows = datasets.Dataset.from_dict({"sentence1": ["the cat sat"], "sentence2": ["a dog ran far away"],
                                       "label": [0], "idx": [0]})
    row = task.featurize(rows, bert, 8)[0]
    # [CLS] the cat sat [SEP] a dog ran far away = 10 >= 8: cut to 7, then [SEP]; the longer text is not cut first
    assert row["input_ids"] == ids(bert, ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "[SEP]"])
    assert row["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_single_sentence_golden_and_cut(bert):
    task = get_task("sst2")
    rows = datasets.Dataset.from_dict({"sentence": ["a great film", " ".join(["film"] * 10)], "label": [1, 0],
                                       "idx": [0, 1]})
    short, long = task.featurize(rows, bert, 8)
    assert short["input_ids"] == ids(bert, ["[CLS]", "a", "great", "film", "[SEP]"])
    assert short["token_type_ids"] == [0] * 5
    assert long["input_ids"] == ids(bert, ["[CLS]", *["film"] * 6, "[SEP]"])


def test_build_pair_edge_exactly_at_the_limit():
    # [CLS] a a a [SEP] b b is 7 tokens; with the final [SEP] it is 8 = the limit, kept whole
    assert build_pair([5, 5, 5], [6, 6], 8, CLS, SEP) == ([CLS, 5, 5, 5, SEP, 6, 6, SEP], [0] * 5 + [1] * 3)
    # one more b token reaches the limit before the final [SEP]: the last b is dropped for it
    assert build_pair([5, 5, 5], [6, 6, 6], 8, CLS, SEP) == ([CLS, 5, 5, 5, SEP, 6, 6, SEP], [0] * 5 + [1] * 3)
