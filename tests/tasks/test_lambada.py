"""LAMBADA as Megatron computes it: featurization (strict or not), the all-labels-right rule, batching, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from task_helpers import FIXTURES, BigramOracle, run_cli
from megahf.tasks import lambada
from megahf.tasks.common import right_padded, vocab_logits


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_split_last_word_is_megatrons():
    assert lambada.split_last_word("He met  Quillfeather ") == ("He met", "Quillfeather")
    # rfind: the LAST occurrence of the word is cut off, the earlier one stays in the context
    assert lambada.split_last_word("dog eats dog") == ("dog eats", "dog")


def test_non_strict_labels_the_last_bpe_token(gpt2):
    [example] = lambada.featurize(["Everyone praised Professor Quillfeather"], gpt2, strict=False)
    assert example.tokens == encode(gpt2, "Everyone praised Professor Quillfeather")
    assert example.num_labels == 1 and example.tokens[-1] == encode(gpt2, "ather")[0]


def test_strict_labels_every_token_of_the_last_word(gpt2):
    [example] = lambada.featurize(["Everyone praised Professor Quillfeather"], gpt2, strict=True)
    word = encode(gpt2, " Quillfeather")
    assert len(word) == 4
    assert example.num_labels == 4
    assert example.tokens == encode(gpt2, "Everyone praised Professor") + word


def test_strict_and_non_strict_differ_exactly_on_multi_token_last_words(gpt2):
    texts = lambada.load_texts(FIXTURES / "lambada_openai.jsonl")
    loose = lambada.featurize(texts, gpt2, strict=False)
    strict = lambada.featurize(texts, gpt2, strict=True)
    multi = 0
    for text, a, b in zip(texts, loose, strict):
        word_tokens = len(encode(gpt2, " " + text.split()[-1]))
        if word_tokens == 1:
            assert a == b, text
        else:
            multi += 1
            assert b.num_labels == word_tokens > a.num_labels == 1
            assert a.tokens[-1] == b.tokens[-1] and a.tokens == b.tokens, text  # same ids, more of them labelled
    assert 0 < multi < len(texts)  # the fixture has both kinds


def golden_case(gpt2):
    """Five passages and a bigram model that gets, by construction, 4 right non-strict and 3 right strict."""
    texts = [
        "The keeper lit the lamp for the keeper",      # ' the' -> ' keeper': right in both modes
        "She watered the plants in her garden",        # ' her' -> ' garden': right in both modes
        "Everyone praised Professor Quillfeather",     # only 'fe' -> 'ather' known: right non-strict, wrong strict
        "We rode home on the bus",                     # ' the' -> ' keeper', not ' bus': wrong in both
        "Then came Quillfeather",                      # the whole word known after ' came': right in both
    ]
    t = lambda s: encode(gpt2, s)  # noqa: E731
    qu, ill, fe, ather = t(" Quillfeather")
    table = {t(" the")[0]: t(" keeper")[0], t(" her")[0]: t(" garden")[0], fe: ather,
             t(" came")[0]: qu, qu: ill, ill: fe}
    return texts, BigramOracle(table)


def test_golden_accuracy_known_exactly(gpt2):
    texts, model = golden_case(gpt2)
    loose = lambada.evaluate(model, gpt2, texts, strict=False, seq_length=64, micro_batch_size=2)
    strict = lambada.evaluate(model, gpt2, texts, strict=True, seq_length=64, micro_batch_size=2)
    assert (loose.correct, loose.total, loose.accuracy) == (4, 5, 0.8)
    assert (strict.correct, strict.total, strict.accuracy) == (3, 5, 0.6)
    assert lambada.correct_flags(model, lambada.featurize(texts, gpt2, strict=True)) == [True, True, False, False,
                                                                                         True]


@pytest.mark.parametrize("strict", [False, True])
def test_batched_equals_one_at_a_time(gpt2, tiny_model, strict):
    texts = lambada.load_texts(FIXTURES / "lambada_openai.jsonl")
    examples = lambada.featurize(texts, gpt2, strict)
    # the logits of a right-padded batch equal those of each passage alone, on every real position
    inputs = [e.tokens[:-1] for e in examples]
    input_ids, attention_mask = right_padded(inputs)
    with torch.no_grad():
        batched = vocab_logits(tiny_model, input_ids, attention_mask)
        for row, ids in enumerate(inputs):
            alone = vocab_logits(tiny_model, *right_padded([ids]))
            torch.testing.assert_close(batched[row, : len(ids)], alone[0], atol=1e-5, rtol=1e-5)
        # keep=k runs the output layer on the last k positions only (logits_to_keep): the same logits there
        kept = vocab_logits(tiny_model, input_ids, attention_mask, keep=5)
        torch.testing.assert_close(kept, batched[:, -5:], atol=1e-5, rtol=1e-5)
    # and so do the verdicts, with a model whose verdicts are not all False
    oracle = BigramOracle({e.tokens[-2]: e.tokens[-1] for e in examples[::2]})
    one = lambada.correct_flags(oracle, examples, micro_batch_size=1)
    assert one == lambada.correct_flags(oracle, examples, micro_batch_size=3)
    assert any(one) and not all(one)
    assert lambada.correct_flags(tiny_model, examples, 1) == lambada.correct_flags(tiny_model, examples, 8)


def test_hub_folder_and_jsonl_fixtures_hold_the_same_passages():
    from_folder = lambada.load_texts(FIXTURES / "lambada_openai")
    assert from_folder == lambada.load_texts(FIXTURES / "lambada_openai.jsonl")
    assert len(from_folder) == 8


@pytest.mark.parametrize("strict", [False, True])
def test_passage_without_context_is_refused(gpt2, strict):
    examples = lambada.featurize(["Quillfeather"], gpt2, strict)  # several tokens, but no context before the word
    if not strict:
        lambada.check_lengths(examples, seq_length=16)  # non-strict: the word's first tokens are the context
        examples = lambada.featurize(["dog"], gpt2, strict)
    with pytest.raises(lambada.EvaluationError, match="passage 1 has no context"):
        lambada.check_lengths(examples, seq_length=16)


def test_passage_longer_than_seq_length_is_refused(gpt2):
    examples = lambada.featurize(["one two three four five six"], gpt2)
    lambada.check_lengths(examples, seq_length=5)
    with pytest.raises(lambada.EvaluationError, match="more than --seq-length 4"):
        lambada.check_lengths(examples, seq_length=4)


# ---- the CLI, end to end on a tiny model saved to tmp ----

@pytest.mark.parametrize("data", ["lambada_openai.jsonl", "lambada_openai"])
def test_cli_lambada_end_to_end(saved_model, tmp_path, capsys, data):
    out_json = tmp_path / "lambada.json"
    status, out, err = run_cli(["evaluate", "lambada", "--model", str(saved_model), "--data", str(FIXTURES / data),
                                "--strict", "--micro-batch-size", "3", "--output-json", str(out_json),
                                "--no-progress"], capsys)
    assert status == 0, err
    report = json.loads(out_json.read_text())
    assert {"accuracy", "correct", "total", "strict", "model", "data", "seq_length", "micro_batch_size"} <= set(report)
    assert report["total"] == 8 and report["strict"] is True and report["seq_length"] == 64
    assert report["tokenizer"] == "the shipped gpt2 tokenizer"
    assert report["accuracy"] == report["correct"] / 8
    assert "megahf evaluate lambada" in out and "accuracy" in out


def write_parquet_folder(folder, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    pq.write_table(pa.table({column: ["a passage"]}), folder / "test-00000-of-00001.parquet")
    return folder


def bert_folder(tmp_path):
    from megahf import MegatronBertConfig, MegatronBertForMaskedLM

    folder = tmp_path / "bert"
    MegatronBertForMaskedLM(MegatronBertConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                                               vocab_size=30522)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, expected", [
    ("missing data", "--data .*missing.jsonl: no such file or folder"),
    ("no text field", "line 1 has no string 'text' field"),
    ("no text column", "has no 'text' column"),
    ("empty data", "no passages"),
    ("seq-length too long", "--seq-length 65 is larger than the model's max_position_embeddings=64"),
    ("bert", "LAMBADA needs a causal language model .* megatron_bert"),
    ("missing model", "--model .*nope: no such folder"),
    ("offline hub", "cannot load LAMBADA from the Hub .* pass --data"),
])
def test_cli_lambada_bad_input_is_one_line(saved_model, tmp_path, capsys, monkeypatch, case, expected):
    import re

    model, extra = str(saved_model), []
    data = tmp_path / "data.jsonl"
    if case == "missing data":
        data = tmp_path / "missing.jsonl"
    elif case == "no text field":
        data.write_text('{"sentence": "a b"}\n')
    elif case == "no text column":
        data = write_parquet_folder(tmp_path / "folder", "sentence")
    elif case == "empty data":
        data.write_text("\n")
    elif case == "seq-length too long":
        data, extra = FIXTURES / "lambada_openai.jsonl", ["--seq-length", "65"]
    elif case == "bert":
        data, model = FIXTURES / "lambada_openai.jsonl", str(bert_folder(tmp_path))
    elif case == "missing model":
        model = str(tmp_path / "nope")
    data_args = [] if case == "offline hub" else ["--data", str(data)]
    if case == "offline hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    status, out, err = run_cli(["evaluate", "lambada", "--model", model, *data_args, *extra, "--no-progress"], capsys)
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("megahf evaluate: error: "), err
    assert re.search(expected, lines[-1]), lines[-1]
    assert "Traceback" not in err and out == ""


def test_tokenizer_is_the_override_else_the_folders_else_the_familys(saved_model, tmp_path, gpt2):
    from megahf.tasks.common import EvaluationError, load_tokenizer

    config = json.loads((saved_model / "config.json").read_text())
    assert load_tokenizer(saved_model, config)[1] == "the shipped gpt2 tokenizer"
    assert load_tokenizer(saved_model, config, "gpt2")[1] == "--tokenizer gpt2"
    own = tmp_path / "with_tokenizer"
    own.mkdir()
    (own / "config.json").write_text(json.dumps(config))
    gpt2.save_pretrained(own)
    assert load_tokenizer(own, config)[1] == f"the tokenizer of {own}"
    with pytest.raises(EvaluationError, match="has 50257 tokens but the model's vocab_size is 1000"):
        load_tokenizer(saved_model, {**config, "vocab_size": 1000})


# ---- recipes: recipes/lambada/gpt.yaml, keys = the flags with underscores, flags win ----

REPO = FIXTURES.parents[3]


@pytest.mark.parametrize("task", ["lambada", "wikitext"])
def test_shipped_recipes_parse_to_megatrons_settings(task):
    from megahf.recipe.evaluate import evaluation_settings

    settings = evaluation_settings(task, str(REPO / "recipes" / task / "gpt.yaml"), {})
    assert settings.model == "runs/gpt-tiny/final" and settings.seq_length is None and settings.data is None
    assert settings.micro_batch_size == 8
    assert (settings.strict is False) if task == "lambada" else (settings.overlapping_eval == 32)


def test_cli_recipe_keys_then_flags(saved_model, tmp_path, capsys):
    recipe = tmp_path / "lambada.yaml"
    out_json = tmp_path / "out.json"
    recipe.write_text(f"model: {saved_model}\ndata: {FIXTURES / 'lambada_openai.jsonl'}\nstrict: true\n"
                      f"micro_batch_size: 2\nseq_length: 32\noutput_json: {out_json}\n")
    status, out, err = run_cli(["evaluate", "lambada", "--recipe", str(recipe), "--seq-length", "48",
                                "--no-progress"], capsys)
    assert status == 0, err
    report = json.loads(out_json.read_text())
    assert report["strict"] is True and report["micro_batch_size"] == 2  # from the recipe
    assert report["seq_length"] == 48  # the flag wins
    status, out, err = run_cli(["evaluate", "lambada", "--recipe", str(recipe), "--no-strict", "--no-progress"],
                               capsys)
    assert status == 0, err
    assert json.loads(out_json.read_text())["strict"] is False  # a boolean flag wins both ways
    recipe.write_text("modle: x\n")
    status, out, err = run_cli(["evaluate", "lambada", "--recipe", str(recipe)], capsys)
    assert status == 2 and err.strip().splitlines()[-1].startswith("megahf evaluate: error: unknown recipe key "
                                                                   "'modle'") and "did you mean 'model'" in err
    status, out, err = run_cli(["evaluate", "lambada", "--data", "x.jsonl"], capsys)
    assert status == 2 and "no model to evaluate: pass --model DIR" in err
