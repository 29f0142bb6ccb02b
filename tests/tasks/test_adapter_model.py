"""`megahf evaluate --model ADAPTER`: a peft adapter folder stands for its base model (named by its adapter_config.json)
with the adapter merged into the weights."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from task_helpers import FIXTURES, run_cli
from transformers import AutoModelForCausalLM


def perplexity(model_folder, tmp_path, capsys) -> dict:
    out_json = tmp_path / f"{model_folder.name}.json"
    status, _, err = run_cli(["evaluate", "wikitext", "--model", str(model_folder), "--data",
                              str(FIXTURES / "wiki.test.raw"), "--seq-length", "32", "--overlapping-eval", "8",
                              "--output-json", str(out_json), "--no-progress"], capsys)
    assert status == 0, err
    return json.loads(out_json.read_text())


def test_an_adapter_folder_is_evaluated_as_its_base_with_the_adapter_merged(saved_model, tmp_path, capsys):
    """The adapter's figures are those of the merged model saved as a folder of its own (1e-5: merging changes only
    the order of the float32 sums, W x + s B (A x) against (W + s B A) x), and not the base's: the adapter's B is
    drawn at random (peft's init_lora_weights=False), so it changes the model."""
    base = AutoModelForCausalLM.from_pretrained(saved_model)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["linear_qkv", "linear_fc2"],
                                              init_lora_weights=False))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    adapted.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(saved_model)
    adapted.merge_and_unload().save_pretrained(merged)
    got, expected, plain = (perplexity(folder, tmp_path, capsys) for folder in (adapter, merged, saved_model))
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert abs(got["loss"] - plain["loss"]) > 1e-3, (got["loss"], plain["loss"])
    assert got["model"] == str(adapter) and got["base_model"] == str(saved_model)
    assert got["tokenizer"] == "the shipped gpt2 tokenizer"


def test_an_adapter_whose_base_is_not_a_local_folder_is_refused_in_one_line(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "alice/gpt-missing"}))
    status, _, err = run_cli(["evaluate", "wikitext", "--model", str(adapter), "--data",
                              str(FIXTURES / "wiki.test.raw"), "--no-progress"], capsys)
    assert status == 2
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "is a peft adapter whose base model 'alice/gpt-missing' is not a local folder" in last, err
