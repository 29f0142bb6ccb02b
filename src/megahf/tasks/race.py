"""RACE as megahf fine-tunes it: Megatron-LM's featurization (tasks/race/data.py) of the Hub dataset ehovy/race
(columns `example_id`, `article`, `question`, `answer` (a letter A-D), `options` (4 strings); configs all, high,
middle).

Each question becomes 4 sequences, one per option: a question holding "_" has every "_" replaced by the option, any
other question gets " " + option appended; that text (cleaned as GLUE's, `glue.clean_text`) is tokenized and cut to
its first 128 tokens (`MAX_QA_LENGTH`); the sequence is `[CLS] question+option [SEP] article [SEP]`, the article
cleaned and tokenized once, the whole cut to `max_seq_length` as `glue.build_pair` does (Megatron: 512). The label is
`ord(answer) - ord("A")` (-1 for an unlabeled row).

Levels: the Hub dataset has no level column; its `example_id` is the source file's name, "high1234.txt" or
"middle567.txt", so `race_level` reads the level from that prefix (the `high` and `middle` configs hold only ids of
their level). Data whose ids start with neither cannot give middle/high accuracies, and loading its evaluation
splits is refused (`task_data.check_split`).
"""

from __future__ import annotations

from .glue import build_pair, tokenize
from .task_spec import TaskDataError

#: RACE's answer letters, in option order.
RACE_LETTERS = ("A", "B", "C", "D")
NUM_CHOICES = len(RACE_LETTERS)
#: Megatron's cap on the tokens of question+option.
MAX_QA_LENGTH = 128
LEVELS = ("middle", "high")


def race_level(example_id: str | None) -> str | None:
    """"middle" or "high" from an ehovy/race `example_id` ("high1234.txt" -> "high"); None when it tells neither."""
    if isinstance(example_id, str):
        for level in LEVELS:
            if example_id.startswith(level):
                return level
    return None


def question_with_option(question: str, option: str) -> str:
    """Megatron's merge: the option fills every "_" of a cloze question, else is appended after a space."""
    return question.replace("_", option) if "_" in question else " ".join([question, option])


def label_of(answer: str | None) -> int:
    return RACE_LETTERS.index(answer) if answer in RACE_LETTERS else -1


def featurize_batch(batch: dict, tokenizer, max_seq_length: int, max_qa_length: int = MAX_QA_LENGTH) -> dict:
    """`datasets.map(batched=True)` function: per row, the 4 sequences' features (lists of 4 lists)."""
    for example_id, options in zip(batch["example_id"], batch["options"]):
        if len(options) != NUM_CHOICES:  # the flat list of question+option texts below relies on 4 per row
            raise TaskDataError(f"RACE row {example_id!r} has {len(options)} options, not {NUM_CHOICES}; fix or "
                                "remove the row")
    articles = tokenize(tokenizer, batch["article"])
    merged = [question_with_option(q, o) for q, options in zip(batch["question"], batch["options"]) for o in options]
    qa_ids = tokenize(tokenizer, merged)
    input_ids, token_type_ids = [], []
    for row, article in enumerate(articles):
        row_ids, row_types = [], []
        for choice in range(NUM_CHOICES):
            qa = qa_ids[row * NUM_CHOICES + choice][:max_qa_length]
            ids, types = build_pair(qa, article, max_seq_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
            row_ids.append(ids)
            row_types.append(types)
        input_ids.append(row_ids)
        token_type_ids.append(row_types)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": [[[1] * len(ids) for ids in row] for row in input_ids],
            "labels": [label_of(a) for a in batch["answer"]]}


__all__ = ["LEVELS", "MAX_QA_LENGTH", "NUM_CHOICES", "RACE_LETTERS", "featurize_batch", "label_of",
           "question_with_option", "race_level"]
