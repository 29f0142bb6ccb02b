"""Fixtures of the Hub tests: the stand-in server, the switch that lets an in-process push reach it, and tiny
trained models saved as megahf saves them (a GPT run folder, a BERT model folder, a LoRA adapter run folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_helpers import BERT_INPUT, FAKE_TOKEN, GPT_INPUT, tiny_bert, tiny_gpt, write_gpt_run  # noqa: E402
from hub_server import HubServer  # noqa: E402


@pytest.fixture(scope="session")
def hub():
    server = HubServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def online(monkeypatch, hub):
    """In this process huggingface_hub was imported offline (tests/conftest.py): allow requests, to the stand-in
    only (push_folder(endpoint=hub.url)), with plain LFS (no Xet) and a fake token; retry delays made short."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # HfApi() without endpoint= (the pretrain hook) uses it
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("MEGAHF_HUB_RETRY_DELAY", "0.01")
    return hub


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The tiny trained models and their folders, built once."""
    import torch
    from megahf.assets import load_bert_tokenizer

    root = tmp_path_factory.mktemp("models")
    gpt = tiny_gpt()
    gpt_run = write_gpt_run(root / "gpt-run", gpt)
    bert = tiny_bert()
    bert.save_pretrained(root / "bert")
    load_bert_tokenizer().save_pretrained(root / "bert")
    with torch.no_grad():
        gpt_logits = gpt(input_ids=torch.tensor(GPT_INPUT)).logits
        bert_logits = bert(input_ids=torch.tensor(BERT_INPUT)).prediction_logits
    return {"root": root, "gpt": gpt, "gpt_run": gpt_run, "gpt_logits": gpt_logits, "bert": bert,
            "bert_dir": root / "bert", "bert_logits": bert_logits}
