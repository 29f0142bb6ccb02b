"""WikiText-103 zero-shot perplexity, as Megatron-LM's tasks/zeroshot_gpt computes it.

1. The raw text is read whole (a raw file such as `wiki.test.raw`, or the `text` rows of a folder laid out like the
   Hub dataset Salesforce/wikitext, config wikitext-103-raw-v1, split test, joined with nothing in between: each row
   keeps its own trailing newline).
2. T0 = `len(text.strip().split(" "))`: the original word count, split on single spaces.
3. The text is detokenized (`detokenize`: the WikiText rules listed in MEGATRON.md), then BPE-tokenized: T tokens.
4. Windows of seq_len + 1 tokens start at i * overlap for i < max(ceil(max(T - 1 - overlap, 0) / overlap) + 1, 1).
   The first window scores its seq_len targets; every later one only the LAST `overlap` positions of the full
   seq_len (positions past the end are padding and score nothing), so each of the T - 1 targets is scored exactly
   once, also in a ragged last window. With overlap == seq_len nothing is masked.
5. loss = summed NLL / (T - 1); perplexity = exp(min(20, loss));
   adjusted perplexity = exp(min(20, loss * (T - 1) / (T0 - 1))).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import EvaluationError, load_hub_rows, progress_bar, right_padded, vocab_logits

HUB_NAME = "Salesforce/wikitext"
HUB_CONFIG = "wikitext-103-raw-v1"
SPLIT = "test"
LOCAL_HINT = ("a raw text file (e.g. wiki.test.raw), or a folder laid out like the Hub dataset "
              f"{HUB_NAME} {HUB_CONFIG} (e.g. megahf's fixture src/megahf/assets/fixtures/wikitext)")

# The WikiText detokenizer's rules, applied in this order. Each is (pattern, replacement, is_regex).
_QUOTED = r"\s*([^{close}]*?)\s*"  # the inner spaces of a bracketed or quoted span are dropped
_DETOKENIZE_RULES: tuple[tuple[str, str, bool], ...] = (
    ("s '", "s'", False),                       # a possessive plural: "players '" -> "players'"
    (r"/' [0-9]/", r"/'[0-9]/", True),          # as Megatron has it (the slashes are literal: it rarely matches)
    (" @-@ ", "-", False),                      # WikiText's escaped separators inside numbers and words
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    *((f" {mark} ", f"{mark} ", False) for mark in ":;.!?,"),  # no space before punctuation
    (r"\(" + _QUOTED.format(close=r"\)") + r"\)", r"(\1)", True),
    (r"\[" + _QUOTED.format(close=r"\]") + r"\]", r"[\1]", True),
    (r"{" + _QUOTED.format(close="}") + r"}", r"{\1}", True),
    (r"\"" + _QUOTED.format(close=r"\"") + r"\"", r'"\1"', True),
    (r"'" + _QUOTED.format(close="'") + r"'", r"'\1'", True),
    ("= = = =", "====", False),                 # section headings
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \u00b0 ", "\u00b0", False),              # degree sign
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),                      # the Penn-Treebank number token
    (" 's", "'s", False),
)


def detokenize(text: str) -> str:
    """WikiText's tokenized text back to ordinary prose, by Megatron's WikiText rules (see `_DETOKENIZE_RULES`)."""
    for pattern, replacement, is_regex in _DETOKENIZE_RULES:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def count_original_tokens(text: str) -> int:
    """T0, Megatron's count of WikiText's own tokens: `len(text.strip().split(" "))`."""
    return len(text.strip().split(" "))


def load_text(data: str | os.PathLike | None) -> str:
    """The whole raw text of `data`: a text file read whole, a folder laid out like Salesforce/wikitext
    (wikitext-103-raw-v1, test: the rows joined), or (None) the Hub dataset itself. Blank text is an error."""
    if data is not None and not Path(data).exists():
        raise EvaluationError(f"--data {data}: no such file or folder; pass {LOCAL_HINT}")
    if data is not None and Path(data).is_file():
        try:
            text = Path(data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise EvaluationError(f"--data {data}: cannot read it as UTF-8 text ({error}); pass {LOCAL_HINT}"
                                  ) from error
    else:
        rows = load_hub_rows(None if data is None else str(data), HUB_NAME, HUB_CONFIG, SPLIT, "WikiText", LOCAL_HINT)
        text = "".join(row or "" for row in rows)
    if not text.strip():
        raise EvaluationError(f"--data {data if data is not None else HUB_NAME}: the text is empty; pass {LOCAL_HINT}")
    return text


@dataclass(frozen=True)
class WikiTextFeatures:
    tokens: list[int]
    num_original_tokens: int  # T0

    @property
    def num_tokenized_tokens(self) -> int:  # T
        return len(self.tokens)


def featurize(text: str, tokenizer) -> WikiTextFeatures:
    """T0 from the raw text, then the detokenized text's BPE tokens (no special tokens)."""
    tokens = list(tokenizer(detokenize(text), add_special_tokens=False)["input_ids"])
    return WikiTextFeatures(tokens=tokens, num_original_tokens=count_original_tokens(text))


@dataclass(frozen=True)
class Window:
    """Tokens `start .. start + len(tokens)` (at most seq_len + 1); `scored[j]` says whether target j (the token at
    start + j + 1) counts."""

    start: int
    tokens: list[int]
    scored: list[bool]


def num_windows(num_tokens: int, overlap: int) -> int:
    """Megatron's window count: max(ceil(max(T - 1 - overlap, 0) / overlap) + 1, 1)."""
    return max(math.ceil(max(num_tokens - 1 - overlap, 0) / overlap) + 1, 1)


def windows(tokens: list[int], seq_length: int, overlap: int) -> list[Window]:
    """Megatron's windows (see the module docstring), without those that score no target (they would add 0)."""
    if not 1 <= overlap <= seq_length:
        raise EvaluationError(f"--overlapping-eval {overlap}: must be between 1 and --seq-length {seq_length}")
    out = []
    for i in range(num_windows(len(tokens), overlap)):
        start = i * overlap
        chunk = tokens[start: start + seq_length + 1]
        scored = [True] * (len(chunk) - 1) + [False] * (seq_length + 1 - len(chunk))  # padding scores nothing
        if i != 0 and overlap != seq_length:
            scored[: seq_length - overlap] = [False] * (seq_length - overlap)  # only the last `overlap` of seq_len
        scored = scored[: max(len(chunk) - 1, 0)]
        if any(scored):
            out.append(Window(start=start, tokens=chunk, scored=scored))
    return out


@dataclass(frozen=True)
class WikiTextResult:
    summed_nll: float
    num_original_tokens: int  # T0
    num_tokenized_tokens: int  # T
    num_scored: int  # T - 1 when every target is scored once

    @property
    def loss(self) -> float:
        return self.summed_nll / max(self.num_tokenized_tokens - 1, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(20.0, self.loss))

    @property
    def adjusted_perplexity(self) -> float:
        ratio = (self.num_tokenized_tokens - 1) / max(self.num_original_tokens - 1, 1)
        return math.exp(min(20.0, self.loss * ratio))


@torch.no_grad()
def window_nlls(model, window_list: list[Window], micro_batch_size: int = 8, pad_id: int = 0,
                progress: bool = False) -> list[tuple[float, int]]:
    """For each window: the float64 sum of the NLL of its scored targets, and how many it scored. Batches of
    `micro_batch_size` windows, right-padded with an attention mask."""
    out: list[tuple[float, int]] = []
    with progress_bar((len(window_list) + micro_batch_size - 1) // micro_batch_size, "WikiText", progress) as bar:
        for begin in range(0, len(window_list), micro_batch_size):
            batch = window_list[begin: begin + micro_batch_size]
            input_ids, attention_mask = right_padded([w.tokens[:-1] for w in batch], pad_id)
            # after the first window only the last `overlap` targets count: the output layer runs from the first
            # scored position of the batch on
            first = min(w.scored.index(True) for w in batch)
            logits = vocab_logits(model, input_ids, attention_mask, keep=input_ids.shape[1] - first).cpu()
            for row, window in enumerate(batch):
                n = len(window.tokens) - 1
                nll = F.cross_entropy(logits[row, : n - first], torch.tensor(window.tokens[first + 1:]),
                                      reduction="none")
                mask = torch.tensor(window.scored[first:])
                out.append((float(nll[mask].double().sum()), int(mask.sum())))
            bar.update(1)
    return out


def add_up(per_window: list[tuple[float, int]]) -> tuple[float, int]:
    """The summed NLL (in window order, in float64: the same sum whichever process scored which window) and the
    number of scored targets."""
    total, count = 0.0, 0
    for nll, scored in per_window:
        total += nll
        count += scored
    return total, count


def summed_nll(model, window_list: list[Window], micro_batch_size: int = 8, pad_id: int = 0,
               progress: bool = False) -> tuple[float, int]:
    """The summed next-token NLL over every scored target of the windows, and how many targets were scored."""
    return add_up(window_nlls(model, window_list, micro_batch_size, pad_id, progress))


def score(model, features: WikiTextFeatures, seq_length: int, overlap: int = 32, micro_batch_size: int = 8,
          pad_id: int = 0, progress: bool = False) -> WikiTextResult:
    if features.num_tokenized_tokens < 2:
        raise EvaluationError(f"the text has {features.num_tokenized_tokens} BPE token(s); perplexity needs at "
                              "least 2: pass a longer text")
    total, count = summed_nll(model, windows(features.tokens, seq_length, overlap), micro_batch_size, pad_id,
                              progress)
    return WikiTextResult(summed_nll=total, num_original_tokens=features.num_original_tokens,
                          num_tokenized_tokens=features.num_tokenized_tokens, num_scored=count)


def evaluate(model, tokenizer, text: str, seq_length: int = 1024, overlap: int = 32, micro_batch_size: int = 8,
             progress: bool = False) -> WikiTextResult:
    """WikiText perplexity of `model` (eval mode, under no_grad) on the raw `text`."""
    features = featurize(text, tokenizer)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score(model, features, seq_length, overlap, micro_batch_size, pad_id, progress)
