"""Fixtures of the evaluation tests: the shipped GPT-2 tokenizer and a tiny MegatronGPT (helpers: task_helpers.py)."""

import pytest
from task_helpers import tiny_gpt

from megahf.assets import load_gpt2_tokenizer


@pytest.fixture(scope="session")
def gpt2():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_gpt()
