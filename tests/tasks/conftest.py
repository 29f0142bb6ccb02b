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


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model):
    """The tiny model saved as a folder without a tokenizer (the shipped GPT-2 one is then used)."""
    folder = tmp_path_factory.mktemp("gpt") / "final"
    tiny_model.save_pretrained(folder)
    return folder
