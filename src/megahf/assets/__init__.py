"""Files shipped with megahf: the GPT-2 BPE and BERT uncased WordPiece tokenizers and a small Shakespeare corpus.

* `gpt2/`: OpenAI's GPT-2 `vocab.json` and `merges.txt` plus the configs that let
  `transformers.AutoTokenizer` load the folder offline (see `gpt2/LICENSE`).
* `bert-uncased/`: Google BERT's uncased WordPiece vocabulary (30,522 entries, the one Megatron's
  uncased BERT uses) as `vocab.txt` and `tokenizer.json`, loadable with `AutoTokenizer`
  (see `bert-uncased/LICENSE`).
* `corpus/shakespeare.jsonl`: four plays, one JSON object per scene with the keys
  `text`, `source` and `id` (see `corpus/NOTICE.md`; rebuilt by
  `scripts/build_corpus.py`).
* `fixtures/`: tiny hand-made stand-ins for LAMBADA (`lambada_openai/`, `lambada_openai.jsonl`), WikiText-103
  (`wikitext/`, `wiki.test.raw`), GLUE (`glue/`, like nyu-mll/glue) and RACE (`race/`, like ehovy/race) in the exact
  Hub schemas, for tests, `megahf finetune --smoke` and offline trials; NOT the real data sets (see
  `fixtures/README.md`; rebuilt by `scripts/build_task_fixtures.py`).

Nothing here needs the network or the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS_DIR",
    "EMBEDDED_TOKENIZERS",
    "bert_tokenizer_path",
    "corpus_path",
    "embedded_tokenizer_path",
    "gpt2_tokenizer_path",
    "load_bert_tokenizer",
    "load_gpt2_tokenizer",
]

#: Folder that holds the shipped assets (inside the installed package).
ASSETS_DIR: Path = Path(__file__).resolve().parent

_GPT2_DIR = ASSETS_DIR / "gpt2"
_BERT_DIR = ASSETS_DIR / "bert-uncased"

#: Names that mean a tokenizer shipped with megahf (recipes' `tokenizer`, `megahf preprocess --tokenizer`).
EMBEDDED_TOKENIZERS = {
    "gpt2": _GPT2_DIR,
    "gpt2-embedded": _GPT2_DIR,
    "embedded": _GPT2_DIR,
    "bert-uncased": _BERT_DIR,
    "bert-uncased-embedded": _BERT_DIR,
}
_CORPUS_FILE = ASSETS_DIR / "corpus" / "shakespeare.jsonl"


def gpt2_tokenizer_path() -> str:
    """Folder of the GPT-2 tokenizer, usable as `AutoTokenizer.from_pretrained(path)`."""
    return str(_GPT2_DIR)


def embedded_tokenizer_path(name: str) -> str | None:
    """The folder of the shipped tokenizer called `name` (see `EMBEDDED_TOKENIZERS`), None for any other name."""
    folder = EMBEDDED_TOKENIZERS.get(name)
    return None if folder is None else str(folder)


def load_gpt2_tokenizer(**kwargs: Any):
    """Load the shipped GPT-2 tokenizer (a `GPT2TokenizerFast`) without touching the network.

    `<|endoftext|>` (id 50256) is the bos, eos and unk token; the vocabulary has 50257
    entries. No pad token is set: callers that need one choose it themselves (for example
    `tok.pad_token = tok.eos_token`). Keyword arguments go to `from_pretrained`.
    """
    from transformers import AutoTokenizer  # imported here so that importing megahf.assets stays cheap

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path(), **kwargs)


def bert_tokenizer_path() -> str:
    """Folder of the BERT uncased WordPiece tokenizer, usable as `AutoTokenizer.from_pretrained(path)`."""
    return str(_BERT_DIR)


def load_bert_tokenizer(**kwargs: Any):
    """Load the shipped BERT uncased WordPiece tokenizer (a fast `BertTokenizer`) without touching the network.

    30,522 entries: `[PAD]` 0, `[UNK]` 100, `[CLS]` 101, `[SEP]` 102, `[MASK]` 103; text is lower-cased
    and accents are stripped; pairs are encoded `[CLS] A [SEP] B [SEP]` with token types 0 and 1.
    Keyword arguments go to `from_pretrained`.
    """
    from transformers import AutoTokenizer  # here, as above: importing megahf.assets stays cheap

    return AutoTokenizer.from_pretrained(bert_tokenizer_path(), **kwargs)


def corpus_path() -> str:
    """Path of `shakespeare.jsonl` (one `{"text", "source", "id"}` object per line)."""
    return str(_CORPUS_FILE)
