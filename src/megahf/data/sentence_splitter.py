"""Splitting a document into sentences without nltk (`--split-sentences` of `megahf preprocess`).

Megatron uses nltk's punkt model, which cannot be had offline. `split_sentences` is a small
documented rule set instead: a sentence ends after `.`, `!`, `?` or `…` (plus closing quotes or
brackets) followed by whitespace and a word that does not start in lower case, unless the word
before the period is a common abbreviation (`Mr.`, `Dr.`, `e.g.` ...) or an initial (`J.`); a
blank line always ends a sentence. Whitespace between sentences is dropped, as punkt does without
`--keep-newlines`.
"""

from __future__ import annotations

import re
from typing import List

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs mt gen col lt sgt capt rev hon inc ltd co no fig vol ch pp e.g i.e cf al approx".split()
)
# A candidate end: terminal punctuation, optional closing quotes/brackets, whitespace; or a blank line.
_CANDIDATE = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\n[ \t\r\f\v]*\n\s*")
_OPENERS = "\"'\u201c\u2018([\u00bf\u00a1"


def split_sentences(text: str) -> List[str]:
    """Split `text` into sentences with the rules in this module's docstring (no nltk needed).

    >>> split_sentences("Mr. Smith came. He left! Did he? yes.\\n\\nNew paragraph")
    ['Mr. Smith came.', 'He left!', 'Did he? yes.', 'New paragraph']
    """
    sentences: List[str] = []
    start = 0
    for m in _CANDIDATE.finditer(text):
        cut = m.start()
        if text[m.start()] != "\n":  # punctuation, not a blank line
            after = m.end()
            while after < len(text) and text[after] in _OPENERS:
                after += 1
            if after < len(text) and text[after].islower():
                continue
            if text[m.start()] == ".":
                word = re.search(r"(\S+)$", text[start : m.start()])
                w = word.group(1).lstrip(_OPENERS).lower() if word else ""
                if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                    continue
            cut = m.end()
        piece = text[start:cut].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    piece = text[start:].strip()
    if piece:
        sentences.append(piece)
    return sentences


__all__ = ["split_sentences"]
