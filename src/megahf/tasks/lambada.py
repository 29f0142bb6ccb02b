"""LAMBADA zero-shot accuracy, as Megatron-LM's tasks/zeroshot_gpt computes it.

* Input: passages (`text`), from Megatron's `.jsonl` (one `{"text": ...}` per line) or a folder laid out like the Hub
  dataset EleutherAI/lambada_openai (split `test`).
* Non-strict (Megatron's default): the whole passage is tokenized; its last BPE token is the one label.
* Strict (`--strict`, Megatron's `--strict-lambada`): `last = text.split()[-1]`, the context is
  `text[:text.rfind(last)].strip()`; context and `" " + last` are tokenized apart, and every token of the word is a
  label.
* No special tokens. With teacher forcing, a passage is correct only if the argmax at every label position equals the
  label; accuracy = correct / passages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import EvaluationError, load_hub_rows, progress_bar, read_jsonl_texts, right_padded, vocab_logits

HUB_NAME = "EleutherAI/lambada_openai"
SPLIT = "test"
LOCAL_HINT = ("a .jsonl file with a 'text' field per line, or a folder laid out like the Hub dataset "
              f"{HUB_NAME} (e.g. megahf's fixture src/megahf/assets/fixtures/lambada_openai)")


@dataclass(frozen=True)
class LambadaExample:
    """One passage: `tokens` = context then label tokens; the last `num_labels` tokens are scored."""

    tokens: list[int]
    num_labels: int


@dataclass(frozen=True)
class LambadaResult:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_texts(data: str | os.PathLike | None) -> list[str]:
    """The passages of `data`: a `.jsonl` file, a folder laid out like EleutherAI/lambada_openai, or (None) the Hub
    dataset itself. Empty data is an error."""
    if data is not None and not Path(data).exists():
        raise EvaluationError(f"--data {data}: no such file or folder; pass {LOCAL_HINT}")
    if data is not None and Path(data).is_file():
        texts = read_jsonl_texts(data)
    else:
        texts = load_hub_rows(None if data is None else str(data), HUB_NAME, None, SPLIT, "LAMBADA", LOCAL_HINT)
    texts = [t for t in texts if t is not None]
    if not texts:
        raise EvaluationError(f"--data {data if data is not None else HUB_NAME}: no passages; pass {LOCAL_HINT}")
    for number, text in enumerate(texts, start=1):
        if not text.split():
            raise EvaluationError(f"--data {data}: passage {number} is blank; remove it or pass {LOCAL_HINT}")
    return texts


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_last_word(text: str) -> tuple[str, str]:
    """Megatron's strict split: the context before the last whitespace-separated word, and that word."""
    last = text.split()[-1]
    return text[: text.rfind(last)].strip(), last


def featurize(texts: list[str], tokenizer, strict: bool = False) -> list[LambadaExample]:
    """Token ids and label counts of each passage, strict or not (see the module docstring)."""
    examples = []
    for text in texts:
        if strict:
            context, last = split_last_word(text)
            labels = _encode(tokenizer, " " + last)
            tokens = _encode(tokenizer, context) + labels
            examples.append(LambadaExample(tokens=tokens, num_labels=len(labels)))
        else:
            examples.append(LambadaExample(tokens=_encode(tokenizer, text), num_labels=1))
    return examples


def check_lengths(examples: list[LambadaExample], seq_length: int) -> None:
    """Every passage must fit one forward (seq_length + 1 tokens, as Megatron's samples)."""
    for number, example in enumerate(examples, start=1):
        if len(example.tokens) - example.num_labels < 1:
            raise EvaluationError(f"passage {number} has no context before its label token(s) (a single word?); "
                                  "LAMBADA needs at least one context token: remove the passage")
        if len(example.tokens) > seq_length + 1:
            raise EvaluationError(f"passage {number} has {len(example.tokens)} tokens, more than --seq-length "
                                  f"{seq_length} + 1; pass a larger --seq-length (up to the model's "
                                  "max_position_embeddings) or remove the passage")


@torch.no_grad()
def correct_flags(model, examples: list[LambadaExample], micro_batch_size: int = 8, pad_id: int = 0,
                  progress: bool = False) -> list[bool]:
    """For each passage (in the order given): is the argmax right at every label position (teacher forcing)?
    Batches of `micro_batch_size` passages of similar lengths (longest first, so little is padding), right-padded
    with an attention mask; the output layer runs only from the first label position of the batch on."""
    flags: list[bool] = [False] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].tokens))
    with progress_bar((len(examples) + micro_batch_size - 1) // micro_batch_size, "LAMBADA", progress) as bar:
        for start in range(0, len(order), micro_batch_size):
            batch = order[start: start + micro_batch_size]
            input_ids, attention_mask = right_padded([examples[i].tokens[:-1] for i in batch], pad_id)
            width = input_ids.shape[1]
            # position p predicts token p + 1: the labels of a passage of n tokens are read at n-1-labels .. n-2
            first = min(len(examples[i].tokens) - 1 - examples[i].num_labels for i in batch)
            predicted = vocab_logits(model, input_ids, attention_mask, keep=width - first).argmax(dim=-1).cpu()
            for row, i in enumerate(batch):
                example = examples[i]
                end = len(example.tokens) - 1 - first  # in the kept positions, which start at `first`
                labels = torch.tensor(example.tokens[-example.num_labels:])
                flags[i] = bool(torch.equal(predicted[row, end - example.num_labels: end], labels))
            bar.update(1)
    return flags


def score(model, examples: list[LambadaExample], micro_batch_size: int = 8, pad_id: int = 0,
          progress: bool = False) -> LambadaResult:
    flags = correct_flags(model, examples, micro_batch_size, pad_id, progress)
    return LambadaResult(correct=sum(flags), total=len(flags))


def evaluate(model, tokenizer, texts: list[str], strict: bool = False, seq_length: int = 1024,
             micro_batch_size: int = 8, progress: bool = False) -> LambadaResult:
    """LAMBADA accuracy of `model` (eval mode, under no_grad) on `texts`."""
    examples = featurize(texts, tokenizer, strict)
    check_lengths(examples, seq_length)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score(model, examples, micro_batch_size, pad_id, progress)
