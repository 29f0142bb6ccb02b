"""GLUE as megahf fine-tunes it: each task's columns, classes and metrics (as the Hub dataset nyu-mll/glue has them),
and Megatron-LM's featurization (tasks/glue/data.py, tasks/data_utils.py).

Featurization, as Megatron's: each text is cleaned (`clean_text`: line breaks and runs of whitespace become one
space, " . " becomes ". "), WordPiece-tokenized without special tokens, and built into `[CLS] a [SEP]` or
`[CLS] a [SEP] b [SEP]` (`build_pair`: token types 0 for [CLS] a [SEP], 1 for b [SEP]). A pair too long for
`max_seq_length` is cut at the end (Megatron cuts the tail of the sequence, not the longer text first) and ends with
[SEP]. Rows stay unpadded; `collate` pads a batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE task as nyu-mll/glue stores it."""

    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]     # ClassLabel names in the Hub's order; () for STS-B (a float score)
    metrics: tuple[str, ...]
    prediction_files: tuple[str, ...]  # GLUE submission file per test split
    names_in_submission: bool = False  # the GLUE server wants label names (MNLI, QNLI, RTE), else class ids


GLUE = {
    "cola": GlueSpec(("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), ("CoLA.tsv",)),
    "sst2": GlueSpec(("sentence",), ("negative", "positive"), ("accuracy",), ("SST-2.tsv",)),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
                     ("MRPC.tsv",)),
    "qqp": GlueSpec(("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), ("QQP.tsv",)),
    "stsb": GlueSpec(("sentence1", "sentence2"), (), ("pearson", "spearmanr"), ("STS-B.tsv",)),
    "mnli": GlueSpec(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                     ("MNLI-m.tsv", "MNLI-mm.tsv"), names_in_submission=True),
    "qnli": GlueSpec(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), ("QNLI.tsv",),
                     names_in_submission=True),
    "rte": GlueSpec(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), ("RTE.tsv",),
                    names_in_submission=True),
    "wnli": GlueSpec(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), ("WNLI.tsv",)),
}


def clean_text(text: str) -> str:
    """Megatron's clean-up of task text: line breaks and runs of whitespace become one space; " . " becomes ". "
    (three passes, as Megatron does, so that runs of " . . ." shrink too)."""
    text = _SPACES.sub(" ", text.replace("\n", " "))
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


def build_pair(a_ids: list[int], b_ids: list[int] | None, max_seq_length: int, cls_id: int, sep_id: int
               ) -> tuple[list[int], list[int]]:
    """Token ids and token types of `[CLS] a [SEP]` (`b_ids` None) or `[CLS] a [SEP] b [SEP]`, at most
    `max_seq_length` long, unpadded, as Megatron's `build_tokens_types_paddings_from_ids` builds them: when
    `[CLS] a [SEP] b` reaches `max_seq_length`, it is cut to `max_seq_length - 1` tokens and a [SEP] appended (so the
    cut may reach into a, and then the last [SEP] still has type 1 when there is a b)."""
    ids = [cls_id, *a_ids, sep_id]
    types = [0] * len(ids)
    if b_ids is not None:
        ids += b_ids
        types += [1] * len(b_ids)
    trimmed = len(ids) >= max_seq_length
    if trimmed:
        ids, types = ids[: max_seq_length - 1], types[: max_seq_length - 1]
    if b_ids is not None or trimmed:
        ids.append(sep_id)
        types.append(0 if b_ids is None else 1)
    return ids, types


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """WordPiece ids of each cleaned text, without special tokens (Megatron's `tokenizer.tokenize`)."""
    return [list(ids) for ids in tokenizer([clean_text(t) for t in texts], add_special_tokens=False)["input_ids"]]


def featurize_batch(batch: dict, tokenizer, text_columns: tuple[str, ...], max_seq_length: int,
                    regression: bool) -> dict:
    """`datasets.map(batched=True)` function: the features of a batch of GLUE rows."""
    first = tokenize(tokenizer, batch[text_columns[0]])
    second = tokenize(tokenizer, batch[text_columns[1]]) if len(text_columns) > 1 else [None] * len(first)
    input_ids, token_type_ids = [], []
    for a, b in zip(first, second):
        ids, types = build_pair(a, b, max_seq_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
        input_ids.append(ids)
        token_type_ids.append(types)
    labels = [float(v) for v in batch["label"]] if regression else [int(v) for v in batch["label"]]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}


__all__ = ["GLUE", "GlueSpec", "build_pair", "clean_text", "featurize_batch", "tokenize"]
