"""WikiText-103 as Megatron computes it: the detokenizer, T0 and T, the sliding window, the perplexities, the CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from task_helpers import FIXTURES, run_cli

from megahf.tasks import wikitext


@pytest.mark.parametrize("raw, expected", [
    ("the players ' league", "the players' league"),
    ("1 @,@ 250 km , 3 @.@ 5 m and a 19th @-@ century bridge", "1,250 km, 3.5 m and a 19th-century bridge"),
    ("Hello , world . Yes ! No ? a : b ; c .", "Hello, world. Yes! No? a: b; c ."),  # a final " ." keeps its space
    ("a ( b c ) [ d ] { e } \" f g \" end", 'a (b c) [d] {e} "f g" end'),
    ("\n = = = Economy = = = \n", "\n=== Economy ===\n"),  # the space after a newline goes
    (" = = History = = \n", " == History ==\n"),  # a leading space at the very start stays
    ("in N years", "in 1 years"),
    ("the town 's river", "the town's river"),
    ("23 \u00b0 C", "23\u00b0C"),
    ("line one \n line two", "line one\nline two"),
])
def test_detokenizer_hand_examples(raw, expected):
    assert wikitext.detokenize(raw) == expected


def test_detokenizer_on_the_fixture():
    text = wikitext.load_text(FIXTURES / "wiki.test.raw")
    assert wikitext.detokenize(text) == (
        " = Exampleton Fixture =\n"
        "Exampleton is a fictional town written for megahf's tests. It is 1,250 km from the coast and has a "
        "population of 3.5 thousand.\n"
        "The town's river (the Fixture River) floods in spring; the 19th-century bridge survived.\n"
        "== History ==\n"
        # Megatron's quote rule pairs the apostrophe of "founders'" with that of "players'" further on
        "Settlers arrived in N. The founders'records say \"the winters were long\", and the summers 23\u00b0C!\n"
        "=== Economy ===\n"
        "Farming, fishing and tourism: the three trades of the players' league [citation needed].\n"
    )


def test_t0_splits_on_single_spaces():
    assert wikitext.count_original_tokens(" a b  c \n") == 4  # "a", "b", "", "c": Megatron's split(" ")
    assert wikitext.count_original_tokens(" = Title = \n \n") == 3  # "=", "Title", "=\n \n"


def test_t0_t_and_adjusted_perplexity_on_a_toy_text(gpt2):
    text = " Hello world , it is N degrees . \n"
    features = wikitext.featurize(text, gpt2)
    assert features.num_original_tokens == 8  # Hello world , it is N degrees .\n
    assert wikitext.detokenize(text) == " Hello world, it is 1 degrees.\n"
    assert features.tokens == gpt2(" Hello world, it is 1 degrees.\n", add_special_tokens=False)["input_ids"]
    t = features.num_tokenized_tokens
    assert t == 9  # " Hello", " world", ",", " it", " is", " 1", " degrees", ".", "\n"
    result = wikitext.WikiTextResult(summed_nll=16.0, num_original_tokens=8, num_tokenized_tokens=t, num_scored=8)
    assert result.loss == 2.0  # 16 / (T - 1)
    assert result.perplexity == pytest.approx(math.exp(2.0))
    assert result.adjusted_perplexity == pytest.approx(math.exp(2.0 * 8 / 7))  # loss * (T - 1) / (T0 - 1)
    capped = wikitext.WikiTextResult(summed_nll=1000.0, num_original_tokens=8, num_tokenized_tokens=9, num_scored=8)
    assert capped.perplexity == capped.adjusted_perplexity == pytest.approx(math.exp(20))


def megatron_masks(num_tokens, seq_length, overlap):
    """Megatron's windows, transcribed independently: (start, mask over the seq_length targets) per window."""
    out = []
    for i in range(wikitext.num_windows(num_tokens, overlap)):
        start = i * overlap
        real = len(range(num_tokens)[start: start + seq_length + 1])
        mask = ([1] * real + [0] * (seq_length + 1 - real))[1:]
        if overlap != seq_length and i != 0:
            mask[:-overlap] = [0] * (seq_length - overlap)
        out.append((start, mask))
    return out


@pytest.mark.parametrize("num_tokens, seq_length, overlap", [
    (2, 8, 4), (5, 8, 4), (9, 8, 4), (10, 8, 4), (37, 8, 4), (38, 8, 3), (100, 16, 5), (64, 16, 16), (63, 16, 16),
    (50, 8, 1), (1000, 64, 32),
])
def test_windows_score_every_target_exactly_once(num_tokens, seq_length, overlap):
    tokens = list(range(100, 100 + num_tokens))
    windows = wikitext.windows(tokens, seq_length, overlap)
    scored = [w.start + j + 1 for w in windows for j, keep in enumerate(w.scored) if keep]
    assert sorted(scored) == list(range(1, num_tokens))  # targets 1 .. T-1, each once
    for w in windows:
        assert len(w.tokens) <= seq_length + 1 and w.tokens == tokens[w.start: w.start + len(w.tokens)]
    # and the windows are Megatron's, less those that score nothing
    expected = [(s, m) for s, m in megatron_masks(num_tokens, seq_length, overlap) if any(m)]
    got = [(w.start, [int(k) for k in w.scored] + [0] * (seq_length - len(w.scored))) for w in windows]
    assert got == expected


def test_window_count_is_megatrons():
    assert wikitext.num_windows(1, 32) == 1 and wikitext.num_windows(33, 32) == 1
    assert wikitext.num_windows(34, 32) == 2 and wikitext.num_windows(1025, 32) == 32


def test_sliding_window_on_a_text_that_fits_equals_one_forward(tiny_model):
    tokens = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    windows = wikitext.windows(tokens, seq_length=48, overlap=8)
    total, count = wikitext.summed_nll(tiny_model, windows, micro_batch_size=4)
    with torch.no_grad():
        ids = torch.tensor([tokens])
        mean = tiny_model(input_ids=ids, labels=ids).loss
    assert count == 39
    assert total == pytest.approx(float(mean) * 39, rel=1e-5)


def test_batched_equals_one_at_a_time(tiny_model):
    tokens = torch.randint(0, 50257, (75,), generator=torch.Generator().manual_seed(4)).tolist()
    windows = wikitext.windows(tokens, seq_length=16, overlap=5)  # a ragged last window
    assert len({len(w.tokens) for w in windows}) == 2  # full windows and a ragged last one
    one = wikitext.summed_nll(tiny_model, windows, micro_batch_size=1)
    many = wikitext.summed_nll(tiny_model, windows, micro_batch_size=4)
    assert one[1] == many[1] == 74
    assert many[0] == pytest.approx(one[0], rel=1e-5)


def test_sliding_window_scores_each_target_with_its_window_context(tiny_model):
    tokens = torch.randint(0, 50257, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    total, count = wikitext.summed_nll(tiny_model, wikitext.windows(tokens, seq_length=12, overlap=4))
    expected = 0.0
    with torch.no_grad():
        for start, mask in megatron_masks(len(tokens), 12, 4):
            chunk = torch.tensor([tokens[start: start + 13]])
            logits = tiny_model(input_ids=chunk[:, :-1]).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none")
            expected += float(nll[torch.tensor(mask[: len(nll)], dtype=torch.bool)].sum())
    assert count == 29 and total == pytest.approx(expected, rel=1e-5)


def test_hub_folder_and_raw_file_fixtures_hold_the_same_text():
    assert wikitext.load_text(FIXTURES / "wikitext") == wikitext.load_text(FIXTURES / "wiki.test.raw")


# ---- the CLI, end to end on a tiny model saved to tmp ----

@pytest.mark.parametrize("data", ["wiki.test.raw", "wikitext"])
def test_cli_wikitext_end_to_end(saved_model, tmp_path, capsys, gpt2, tiny_model, data):
    out_json = tmp_path / "wikitext.json"
    status, out, err = run_cli(["evaluate", "wikitext", "--model", str(saved_model), "--data", str(FIXTURES / data),
                                "--seq-length", "32", "--overlapping-eval", "8", "--output-json", str(out_json),
                                "--no-progress"], capsys)
    assert status == 0, err
    report = json.loads(out_json.read_text())
    assert {"loss", "perplexity", "adjusted_perplexity", "num_original_tokens", "num_tokenized_tokens", "model",
            "data", "seq_length", "overlapping_eval", "micro_batch_size"} <= set(report)
    text = wikitext.load_text(FIXTURES / "wiki.test.raw")
    expected = wikitext.evaluate(tiny_model, gpt2, text, seq_length=32, overlap=8)
    assert report["num_original_tokens"] == expected.num_original_tokens == wikitext.count_original_tokens(text)
    assert report["num_tokenized_tokens"] == expected.num_tokenized_tokens
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert report["adjusted_perplexity"] == pytest.approx(expected.adjusted_perplexity, rel=1e-4)
    assert "megahf evaluate wikitext" in out and "adjusted_perplexity" in out


@pytest.mark.parametrize("case, expected", [
    ("missing data", "--data .*missing.raw: no such file or folder"),
    ("empty data", "the text is empty"),
    ("seq-length too long", "--seq-length 100 is larger than the model's max_position_embeddings=64"),
    ("bad overlap", r"overlapping_eval=0 \(--overlapping-eval\): must be at least 1"),
    ("overlap past seq-length", "--overlapping-eval 65: must be between 1 and --seq-length 64"),
    ("bad batch", r"micro_batch_size=0 \(--micro-batch-size\): must be at least 1"),
    ("no config", "the folder has no config.json"),
])
def test_cli_wikitext_bad_input_is_one_line(saved_model, tmp_path, capsys, case, expected):
    model, data, extra = str(saved_model), FIXTURES / "wiki.test.raw", []
    if case == "missing data":
        data = tmp_path / "missing.raw"
    elif case == "empty data":
        data = tmp_path / "empty.raw"
        data.write_text(" \n \n")
    elif case == "seq-length too long":
        extra = ["--seq-length", "100"]
    elif case == "bad overlap":
        extra = ["--overlapping-eval", "0"]
    elif case == "overlap past seq-length":
        extra = ["--overlapping-eval", "65"]
    elif case == "bad batch":
        extra = ["--micro-batch-size", "0"]
    elif case == "no config":
        model = str(tmp_path)
    status, out, err = run_cli(["evaluate", "wikitext", "--model", model, "--data", str(data), *extra,
                                "--no-progress"], capsys)
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("megahf evaluate: error: ") and re.search(expected, lines[-1]), err
    assert "Traceback" not in err and out == ""
