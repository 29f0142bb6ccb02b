"""Push tiny trained megahf models to the Hub stand-in, then load them in a fresh process that cannot import
megahf, with transformers' Auto classes and `trust_remote_code=True` (and peft for the LoRA adapter), and compare
the logits with the original models'. Also: a pinned revision, re-sharded weights, the card's own usage snippet,
and a second push of the same folder uploading nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_helpers import BERT_INPUT, FAKE_TOKEN, GPT_INPUT, _train, subprocess_env, write_gpt_run

LOADER = Path(__file__).with_name("_load_without_megahf.py")


def _lora_run(root: Path, bert_dir: Path) -> tuple[Path, torch.Tensor]:
    """A `megahf finetune` LoRA output_dir: final/ holds the peft adapter (the task head trained fully) and
    the tokenizer; results.json the dev metrics."""
    from megahf.assets import load_bert_tokenizer
    from megahf.models.bert import MegatronBertForSequenceClassification
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    base = MegatronBertForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["linear_qkv", "linear_fc1"], lora_dropout=0.0,
                        modules_to_save=["classification_head"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    ids = torch.tensor(BERT_INPUT * 2)
    _train(model, {"input_ids": ids, "labels": torch.tensor([0, 2])}, steps=3)  # lora_B starts at 0: train it
    run = root / "bert-lora-run"
    model.save_pretrained(run / "final")
    load_bert_tokenizer().save_pretrained(run / "final")
    results = {"task": "mnli", "dataset": "nyu-mll/glue", "dataset_config": "mnli", "dataset_path": None,
               "smoke": False, "split": "validation_matched", "main_metric": "accuracy",
               "metrics": {"accuracy": 0.3412}, "eval_splits": ["validation_matched", "validation_mismatched"],
               "validation_matched": {"accuracy": 0.3412}, "validation_mismatched": {"accuracy": 0.3378},
               "predictions": {}, "model": str(bert_dir), "peft": "lora", "optim": "adamw", "steps": 3}
    (run / "results.json").write_text(json.dumps(results))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(BERT_INPUT)).logits
    return run, logits


@pytest.fixture(scope="module")
def pushed(models, hub, tmp_path_factory):
    """Every push of this module, then one loading process: its report and logits."""
    from megahf.hub import push_folder
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("push")
    # a second state of the GPT (one more step), pushed to main re-sharded; the first stays on branch v1
    gpt2 = type(models["gpt"])(models["gpt"].config)
    gpt2.load_state_dict(models["gpt"].state_dict())
    ids = torch.tensor(GPT_INPUT * 2)
    _train(gpt2, {"input_ids": ids, "labels": ids}, steps=1)
    gpt2_run = write_gpt_run(root / "gpt-run-2", gpt2)
    with torch.no_grad():
        gpt2_logits = gpt2(input_ids=torch.tensor(GPT_INPUT)).logits
    lora_run, lora_logits = _lora_run(root, models["bert_dir"])
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        from huggingface_hub import constants

        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        say = logs.append
        results = {
            "gpt_v1": push_folder(models["gpt_run"], "alice/gpt-tiny", revision="v1", endpoint=hub.url, say=say),
            "gpt_main": push_folder(gpt2_run, "alice/gpt-tiny", max_shard_size="2MB", endpoint=hub.url, say=say),
            "bert": push_folder(models["bert_dir"], "alice/bert-tiny", endpoint=hub.url, say=say),
            "lora": push_folder(lora_run, "alice/bert-tiny-mnli-lora", base_model="alice/bert-tiny",
                                endpoint=hub.url, say=say),
        }
        uploads_before = list(hub.lfs_uploads)
        commits_before = len(hub.commits)
        results["gpt_main_again"] = push_folder(gpt2_run, "alice/gpt-tiny", max_shard_size="2MB",
                                                endpoint=hub.url, say=say)
        second = {"lfs": hub.lfs_uploads[len(uploads_before):], "commits": hub.commits[commits_before:]}
    jobs = [
        {"name": "gpt_v1", "kind": "model", "auto": "AutoModelForCausalLM", "repo": "alice/gpt-tiny",
         "revision": "v1", "input": GPT_INPUT},
        {"name": "gpt_main", "kind": "model", "auto": "AutoModelForCausalLM", "repo": "alice/gpt-tiny",
         "input": GPT_INPUT},
        {"name": "bert", "kind": "model", "auto": "AutoModelForMaskedLM", "repo": "alice/bert-tiny",
         "input": BERT_INPUT},
        {"name": "lora", "kind": "peft", "auto": "AutoModelForSequenceClassification", "base": "alice/bert-tiny",
         "base_kwargs": {"num_labels": 3}, "repo": "alice/bert-tiny-mnli-lora", "input": BERT_INPUT},
        {"name": "gpt_snippet", "kind": "snippet", "repo": "alice/gpt-tiny", "revision": "v1"},
        {"name": "bert_snippet", "kind": "snippet", "repo": "alice/bert-tiny"},
        {"name": "lora_snippet", "kind": "snippet", "repo": "alice/bert-tiny-mnli-lora"},
    ]
    work = root / "loader"
    work.mkdir()
    (work / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(LOADER), str(work / "jobs.json"), str(work)], cwd=work,
                          env=subprocess_env(hub, work / "hf-home"), capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"results": results, "second": second, "logs": logs, "loader": done,
            "report": json.loads((work / "report.json").read_text()),
            "logits": load_file(str(work / "logits.safetensors")), "gpt2_logits": gpt2_logits,
            "lora_logits": lora_logits, "lora_run": lora_run, "gpt2_run": gpt2_run}


def test_the_loading_process_cannot_import_megahf(pushed):
    report = pushed["report"]
    assert report["megahf_importable"] is False and "blocked" in report["megahf_error"]
    assert report["loaded_megahf_modules"] == []
    assert report["gpt_main.class"].startswith("transformers_modules.") and \
        report["gpt_main.class"].endswith("modeling_megatron_gpt.MegatronGPTForCausalLM")
    assert report["bert.class"].endswith("modeling_megatron_bert.MegatronBertForMaskedLM")


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Same code, weights, input and one CPU thread in both processes: equal to float32 rounding of the logits
    # (1e-6 of their scale, a few ulps).
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * max(scale, 1.0))


def test_logits_equal_the_original_models(pushed, models):
    logits = pushed["logits"]
    _same(logits["gpt_v1"], models["gpt_logits"])
    _same(logits["gpt_main"], pushed["gpt2_logits"])
    _same(logits["bert"], models["bert_logits"])  # the pretraining checkpoint, loaded as AutoModelForMaskedLM
    _same(logits["lora"], pushed["lora_logits"])


def test_a_pinned_revision_loads_its_own_weights(pushed, models):
    """v1 holds the first model, main the one trained a step further: each revision gives its own logits."""
    difference = (pushed["logits"]["gpt_v1"] - pushed["logits"]["gpt_main"]).abs().max().item()
    assert difference > 1e-3


def test_what_is_uploaded(pushed, hub):
    gpt_v1 = set(hub.files("alice/gpt-tiny", "v1"))
    code = {"configuration_megatron_gpt.py", "modeling_megatron_gpt.py", "layers.py", "padded_vocab.py",
            "config_checks.py", "presets.py"}
    assert code <= gpt_v1
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss.png", "metrics.json", "recipe.yaml", "eval/lambada.json",
            "eval/wikitext.json"} <= gpt_v1
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in gpt_v1)
    config = json.loads(hub.files("alice/gpt-tiny", "v1")["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_megatron_gpt.MegatronGPTForCausalLM"
    # main was pushed with --max-shard-size 2MB: shards and an index, and the unsharded file of v1 is not there
    main = hub.files("alice/gpt-tiny", "main")
    shards = sorted(n for n in main if n.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in main and "model.safetensors" not in main
    index = json.loads(main["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # at most 2 MB of tensors, unless one tensor alone is larger (the 6.4 MB embedding)
        tensors = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(main[shard]) <= 2_000_000 or len(tensors) == 1, (shard, len(main[shard]), tensors)
    bert = json.loads(hub.files("alice/bert-tiny")["config.json"])
    assert set(bert["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForMaskedLM",
                                     "AutoModelForSequenceClassification", "AutoModelForMultipleChoice",
                                     "AutoModelForQuestionAnswering", "AutoModelForTokenClassification"}
    lora = hub.files("alice/bert-tiny-mnli-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "results.json", "README.md"} <= set(lora)
    assert json.loads(lora["adapter_config.json"])["base_model_name_or_path"] == "alice/bert-tiny"
    # the local adapter folder still names its local base: the staged copy was rewritten, not the folder
    local = json.loads((pushed["lora_run"] / "final" / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] != "alice/bert-tiny"
    assert hub.repos["alice/gpt-tiny"].private is False


def test_the_card_usage_snippets_run_as_written(pushed):
    report = pushed["report"]
    output = pushed["loader"].stdout + pushed["loader"].stderr
    assert "Do you wish to run the custom code" not in output  # no prompt (input() writes it to stdout)
    assert "to instantiate a model of type ``" not in output  # ... and no fallback config after a refused prompt
    assert report["gpt_snippet.ran"] and report["bert_snippet.ran"] and report["lora_snippet.ran"]


def test_pushing_unchanged_files_again_uploads_nothing(pushed):
    again = pushed["results"]["gpt_main_again"]
    assert again.commit is None and again.uploaded == [] and again.deleted == []
    assert len(again.unchanged) == len(pushed["results"]["gpt_main"].uploaded)
    assert pushed["second"] == {"lfs": [], "commits": []}
    assert any("nothing to push" in line for line in pushed["logs"])


def test_the_token_is_sent_but_never_printed(pushed, hub):
    assert f"Bearer {FAKE_TOKEN}" in hub.authorizations
    everything = "\n".join(pushed["logs"]) + pushed["loader"].stdout + pushed["loader"].stderr
    assert FAKE_TOKEN not in everything
    for repo in hub.repos.values():
        for files in repo.commits.values():
            assert all(FAKE_TOKEN.encode() not in f.data for f in files.values())
