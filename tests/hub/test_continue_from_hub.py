"""`model:` as a Hub id: the checkpoint is downloaded once (config, safetensors, tokenizer; never a pickle) from the
Hub stand-in into the Hugging Face cache, and the run reads that folder as any local one (the loading itself is
tests/test_continue_pretraining.py's); an unreachable id is one line with the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continue_helpers import llama_folder  # noqa: E402

from megahf.recipe import RecipeError  # noqa: E402
from megahf.training import load_recipe  # noqa: E402
from megahf.training.model_source import checkpoint_path  # noqa: E402
from megahf.training.setup import build_config, load_tokenizer  # noqa: E402


def test_a_hub_id_continues_like_its_folder(online, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    # downloads build their URLs from this template (made from HF_ENDPOINT when huggingface_hub was imported)
    template = online.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    folder = llama_folder(tmp_path / "llama")
    (folder / "pytorch_model.bin").write_bytes(b"a pickle the download must leave out")
    api = HfApi(endpoint=online.url, token="hf_fake")
    api.create_repo("someone/tiny-llama")
    api.upload_folder(repo_id="someone/tiny-llama", folder_path=folder)
    checkpoint_path.cache_clear()
    args = ["--model", "someone/tiny-llama", "--tokenizer", str(folder), "--output_dir", str(tmp_path / "out"),
            "--seq_length", "32", "--warmup_steps", "1"]
    recipe = load_recipe(None, args)  # the config read from the download
    downloaded = checkpoint_path("someone/tiny-llama")
    assert (downloaded / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert not (downloaded / "pytorch_model.bin").exists()
    load_tokenizer(recipe)  # the downloaded tokenizer files are the checkpoint's own: compared with the local copy
    assert build_config(recipe.model).num_query_groups == 2


def test_an_unreachable_hub_id_is_refused_with_the_fix(tmp_path):
    checkpoint_path.cache_clear()
    with pytest.raises(RecipeError, match=r"model='someone/not-here' is not a local folder, and the Hub id cannot be "
                                          r"fetched .*hf download someone/not-here --local-dir DIR"):
        load_recipe(None, ["--model", "someone/not-here", "--output_dir", str(tmp_path / "out")])
