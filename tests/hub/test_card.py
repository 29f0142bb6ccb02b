"""The model card: huggingface_hub's own parsers read its metadata and model-index; each result in the folder's
JSON files becomes the model-index entry the module docstring of megahf.hub.model_index promises; fixture results
stay out of it; adapters, fine-tuned and converted models name their base; the card renders the same twice."""

from __future__ import annotations

import json
import shutil

import pytest

from megahf.cli import main


def _card(folder, tmp_path, *extra):
    out = tmp_path / "README.md"
    assert main(["card", str(folder), "--output", str(out), *extra]) == 0
    return out


def test_the_card_parses_with_huggingface_hubs_parsers(models, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    path = _card(models["gpt_run"], tmp_path, "--repo-id", "alice/gpt-tiny")
    meta = metadata_load(path)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and "megatron" in meta["tags"]
    card = ModelCard.load(path)
    results = {(r.dataset_type, r.metric_name): r for r in card.data.eval_results}
    run = models["gpt_run"]
    lambada = json.loads((run / "eval" / "lambada.json").read_text())
    wikitext = json.loads((run / "eval" / "wikitext.json").read_text())
    assert set(results) == {("EleutherAI/lambada_openai", "LAMBADA accuracy"),
                            ("Salesforce/wikitext", "WikiText-103 perplexity (BPE tokens)"),
                            ("Salesforce/wikitext", "WikiText-103 adjusted perplexity (WikiText tokens)")}
    acc = results[("EleutherAI/lambada_openai", "LAMBADA accuracy")]
    assert (acc.task_type, acc.metric_type, acc.metric_value, acc.dataset_split) == \
        ("text-generation", "accuracy", lambada["accuracy"], "test")
    ppl = results[("Salesforce/wikitext", "WikiText-103 perplexity (BPE tokens)")]
    assert (ppl.metric_type, ppl.metric_value, ppl.dataset_config) == \
        ("perplexity", wikitext["perplexity"], "wikitext-103-raw-v1")
    assert results[("Salesforce/wikitext", "WikiText-103 adjusted perplexity (WikiText tokens)")].metric_value == \
        wikitext["adjusted_perplexity"]
    text = card.text
    # the evaluation on the shipped fixture is shown, marked, and not in the metadata
    assert "shipped fixture, NOT the real data" in text and "0.5" in text
    assert "![Training and validation loss](loss.png)" in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['tokens_seen']:,}" in text and "0.2%" in text and metrics["layout"] in text
    parameters = sum(p.numel() for p in models["gpt"].state_dict().values()) - \
        models["gpt"].model.embedding.word_embeddings.weight.numel()  # the tied output layer is saved once
    assert f"| parameters | {parameters:,} |" in text
    assert "trust_remote_code=True" in text and "four Shakespeare plays" in text


def test_the_same_folder_renders_the_same_card(models, tmp_path):
    first = _card(models["gpt_run"], tmp_path).read_text()
    assert _card(models["gpt_run"], tmp_path).read_text() == first


def _finetune_run(tmp_path, models, results):
    run = tmp_path / "finetune"
    shutil.copytree(models["bert_dir"], run / "final")
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_glue_results_become_model_index_entries(models, tmp_path):
    from huggingface_hub import ModelCard

    results = {"task": "mrpc", "dataset": "nyu-mll/glue", "dataset_config": "mrpc", "smoke": False,
               "split": "validation", "main_metric": "accuracy", "metrics": {"accuracy": 0.8, "f1": 0.85},
               "eval_splits": ["validation"], "validation": {"accuracy": 0.8, "f1": 0.85},
               "model": "alice/bert-tiny"}
    card = ModelCard.load(_card(_finetune_run(tmp_path, models, results), tmp_path))
    got = {(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type): r.metric_value
           for r in card.data.eval_results}
    assert got == {("text-classification", "nyu-mll/glue", "mrpc", "validation", "accuracy"): 0.8,
                   ("text-classification", "nyu-mll/glue", "mrpc", "validation", "f1"): 0.85}
    assert card.data.base_model == "alice/bert-tiny" and card.data.datasets == ["nyu-mll/glue"]


def test_race_results_are_multiple_choice_and_fixture_results_stay_out(models, tmp_path):
    from huggingface_hub import ModelCard

    race = {"task": "race", "dataset": "ehovy/race", "dataset_config": "all", "smoke": False, "split": "validation",
            "eval_splits": ["validation", "test"], "validation": {"accuracy": 0.41}, "test": {"accuracy": 0.4},
            "metrics": {"accuracy": 0.41}, "model": "runs/bert/final"}
    card = ModelCard.load(_card(_finetune_run(tmp_path, models, race), tmp_path))
    assert {(r.task_type, r.dataset_split, r.metric_value) for r in card.data.eval_results} == \
        {("multiple-choice", "validation", 0.41), ("multiple-choice", "test", 0.4)}
    assert card.data.base_model is None  # a local folder is not a Hub id
    smoke = {**race, "smoke": True}
    (tmp_path / "finetune" / "results.json").write_text(json.dumps(smoke))
    card = ModelCard.load(_card(tmp_path / "finetune", tmp_path))
    assert card.data.eval_results is None
    assert "shipped fixture" in card.text and "predictions are meaningless" in card.text


def test_an_adapter_card_names_its_base_model(models, tmp_path):
    from huggingface_hub import ModelCard

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "base_model_name_or_path": "/somewhere/gpt/final", "target_modules": ["linear_qkv"]}))
    shutil.copy(models["gpt_run"] / "final" / "model.safetensors", adapter / "adapter_model.safetensors")
    card = ModelCard.load(_card(adapter, tmp_path))
    assert card.data.library_name == "peft" and card.data.base_model is None
    assert "megahf push" in card.text and "--base-model" in card.text  # says how to name a Hub base
    card = ModelCard.load(_card(adapter, tmp_path, "--base-model", "alice/gpt-tiny", "--repo-id", "alice/lora"))
    assert card.data.base_model == "alice/gpt-tiny" and card.data.base_model_relation == "adapter"
    assert card.data.pipeline_tag == "text-generation"
    assert 'PeftModel.from_pretrained(base, "alice/lora")' in card.text


def test_the_conversion_proof_is_shown(models, tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "converted"
    shutil.copytree(models["bert_dir"], folder)
    proof = {"source": "google-bert/bert-base-uncased", "source_format": "transformers BertForPreTraining",
             "max_abs_logit_diff": 3.1e-6, "mean_abs_logit_diff": 4.2e-7, "tolerance": 1e-5, "round_trip": "exact",
             "inputs": "8 sequences of 128 tokens"}
    (folder / "conversion.json").write_text(json.dumps(proof))
    card = ModelCard.load(_card(folder, tmp_path))
    assert "## Conversion proof" in card.text
    assert "3.1e-06" in card.text and "4.2e-07" in card.text and "exact" in card.text
    assert "8 sequences of 128 tokens" in card.text
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.pipeline_tag == "fill-mask"


def test_card_errors_are_one_line(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megahf card: error: ") and "holds no model" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text("{not json")
    assert main(["card", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["PretrainRecipe", "FinetuneRecipe"])
@pytest.mark.parametrize("key,value,error", [
    ("push_to_hub", True, "hub_model_id=''"),
    ("hub_model_id", "not-a-repo", "USER/NAME"),
])
def test_recipe_keys_are_checked(verb, key, value, error, tmp_path):
    import megahf.recipe
    from megahf.recipe import RecipeError, parse_recipe

    recipe = tmp_path / "r.yaml"
    needed = "model: bert-tiny\n" if verb == "FinetuneRecipe" else ""  # the one key a finetune recipe must have
    recipe.write_text(f"{needed}{key}: {json.dumps(value)}\n")
    with pytest.raises(RecipeError, match=error):
        parse_recipe(getattr(megahf.recipe, verb), recipe)


def test_the_pretrain_hook_pushes_the_run(online, models, tmp_path):
    from megahf.recipe import PretrainRecipe, parse_recipe
    from megahf.training.publish import check_hub_push, push_to_hub

    recipe = parse_recipe(PretrainRecipe, None, ["--push_to_hub", "--hub_model_id", "alice/from-recipe",
                                                 "--hub_revision", "step-3"])
    check_hub_push(recipe)
    push_to_hub(recipe, models["gpt_run"])
    files = online.files("alice/from-recipe", "step-3")
    assert {"model.safetensors", "README.md", "metrics.json", "loss.png"} <= set(files)
    assert 'revision="step-3"' in files["README.md"].decode()
    not_pushed = parse_recipe(PretrainRecipe, None, [])
    requests = len(online.requests)
    push_to_hub(not_pushed, models["gpt_run"])
    assert len(online.requests) == requests


def test_the_card_lists_the_shards_a_push_would_write(models, tmp_path):
    text = _card(models["gpt_run"], tmp_path, "--max-shard-size", "2MB").read_text()
    assert "- `model.safetensors.index.json`" in text and "- `model-00001-of-" in text
    assert "- `model.safetensors`" not in text
    assert not list(tmp_path.glob("*.safetensors"))  # listed, not written
