"""Files shipped with megahf: the GPT-2 BPE tokenizer and a small Shakespeare corpus.

* ``gpt2/``: OpenAI's GPT-2 ``vocab.json`` and ``merges.txt`` plus the configs that let
  ``transformers.AutoTokenizer`` load the folder offline (see ``gpt2/LICENSE``).
* ``corpus/shakespeare.jsonl``: four plays, one JSON object per scene with the keys
  ``text``, ``source`` and ``id`` (see ``corpus/NOTICE.md``; rebuilt by
  ``scripts/build_corpus.py``).

Nothing here needs the network or the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ASSETS_DIR", "corpus_path", "gpt2_tokenizer_path", "load_gpt2_tokenizer"]

#: Folder that holds the shipped assets (inside the installed package).
ASSETS_DIR: Path = Path(__file__).resolve().parent

_GPT2_DIR = ASSETS_DIR / "gpt2"
_CORPUS_FILE = ASSETS_DIR / "corpus" / "shakespeare.jsonl"


def gpt2_tokenizer_path() -> str:
    """Folder of the GPT-2 tokenizer, usable as ``AutoTokenizer.from_pretrained(path)``."""
    return str(_GPT2_DIR)


def load_gpt2_tokenizer(**kwargs: Any):
    """Load the shipped GPT-2 tokenizer (a ``GPT2TokenizerFast``) without touching the network.

    ``<|endoftext|>`` (id 50256) is the bos, eos and unk token; the vocabulary has 50257
    entries. No pad token is set: callers that need one choose it themselves (for example
    ``tok.pad_token = tok.eos_token``). Keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoTokenizer  # imported here so that importing megahf.assets stays cheap

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path(), **kwargs)


def corpus_path() -> str:
    """Path of ``shakespeare.jsonl`` (one ``{"text", "source", "id"}`` object per line)."""
    return str(_CORPUS_FILE)
