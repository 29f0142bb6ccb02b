"""`megahf finetune`: a tiny pretrained BERT fine-tuned on the shipped separable fixtures (SST-2-like and RACE), fully,
with LoRA, with bitsandbytes' 8-bit AdamW and with QLoRA; the outputs and their schema; adapters that reload; the
errors raised before anything is computed; the CLI end to end.

The "pretrained" model is a randomly initialised MegatronBertForPreTraining (hidden 64, 2 layers) saved with the shipped
WordPiece tokenizer, as a pretraining run's final/ is; dropout off and weights drawn with std 1/sqrt(hidden) instead of
Megatron's 0.02 (trained weights are that large: at 0.02 a random encoder's [CLS] features hardly depend on the words,
and a frozen one, under LoRA, gives the head nothing to learn from), so that a few steps learn the fixture's cue.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import megahf
from finetune_helpers import above_chance, save_tiny_pretrained_bert
from megahf.cli import main as cli_main
from megahf.models.bert import MegatronBertForPreTraining
from megahf.models.gpt import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.recipe import RecipeError
from megahf.training import checkpoint as ckpt
from megahf.training.finetune import load_finetune_recipe, run_finetune
from megahf.training.safe_checkpoint_reader import SafeFileSystemReader

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from _launch import launch, losses  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
KILLED = REPO_ROOT / "tests" / "distributed" / "_finetune_killed.py"
GLUE = REPO_ROOT / "recipes" / "glue"
RACE = REPO_ROOT / "recipes" / "race" / "race.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_pretrained_bert(tmp_path_factory.mktemp("pretrained") / "final")


def keys(base: Path, out: Path, **extra) -> list[str]:
    """A short run on the shipped fixture: batch 8, lr 3e-3, 24 steps, evaluated every 12."""
    values = {"model": base, "output_dir": out, "smoke": "true", "micro_batch_size": 8, "global_batch_size": 8,
              "learning_rate": 3e-3, "train_steps": 24, "warmup_steps": 2, "warmup_fraction": 0, "eval_interval": 12,
              "log_interval": 4, **extra}
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def finetune(recipe: Path, base: Path, out: Path, **extra):
    return run_finetune(load_finetune_recipe(recipe, keys(base, out, **extra)))


def dev_losses(run) -> list[float]:
    return [e["eval_loss"] for e in run.trainer.state.log_history if "eval_loss" in e]


@pytest.fixture(scope="module")
def sst2(base, tmp_path_factory):
    return finetune(GLUE / "sst2.yaml", base, tmp_path_factory.mktemp("sst2") / "out")


def test_full_finetuning_learns_sst2(sst2):
    rows = len(sst2.trainer.data.evals["validation"][1])
    assert sst2.results["metrics"]["accuracy"] >= above_chance(0.5, rows), sst2.results
    # and it learned: the dev cross entropy fell clearly below ln 2, that of a model that cannot tell the classes apart
    assert dev_losses(sst2)[-1] < 0.75 * math.log(2), dev_losses(sst2)
    assert isinstance(sst2.model, megahf.MegatronBertForSequenceClassification)


def test_results_files_follow_the_documented_schema(sst2):
    out = sst2.output_dir
    results = json.loads((out / "results.json").read_text())
    assert results == sst2.results
    for key in ("task", "dataset", "dataset_config", "dataset_path", "smoke", "split", "main_metric", "metrics",
                "eval_splits", "dev_loss", "predictions", "model", "peft", "optim", "steps", "epochs", "train_rows",
                "global_batch_size", "learning_rate", "max_seq_length", "seed", "layout"):
        assert key in results, key
    assert (results["task"], results["dataset"], results["dataset_config"], results["split"]) == (
        "sst2", "nyu-mll/glue", "sst2", "validation")
    assert results["smoke"] is True and results["steps"] == 24 and results["peft"] == "none"
    assert results["metrics"] == results["validation"] and set(results["metrics"]) == {"accuracy"}
    assert results["dev_loss"] == {"validation": pytest.approx(dev_losses(sst2)[-1])}
    table = (out / "results.md").read_text()
    assert "FIXTURE" in table and f"| validation | accuracy | {results['metrics']['accuracy']:.4f} |" in table
    # one prediction per test row, in the GLUE submission format
    assert results["predictions"] == {"test": "predictions/SST-2.tsv"}
    lines = (out / "predictions" / "SST-2.tsv").read_text().splitlines()
    test_rows = len(sst2.trainer.data.tests["test"][1])
    assert lines[0] == "index\tprediction" and len(lines) == test_rows + 1
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    assert (out / "loss.png").stat().st_size > 0
    # recipe.yaml is the recipe as run: it loads again, with the resolved steps
    again = load_finetune_recipe(out / "recipe.yaml")
    assert (again.optim.train_steps, again.optim.warmup_steps, again.task.task) == (24, 2, "sst2")


def test_final_model_reloads_with_the_auto_class(sst2):
    model = AutoModelForSequenceClassification.from_pretrained(sst2.output_dir / "final").eval()
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"
    batch = sst2.tokenizer(["a wonderful day", "an awful day"], return_tensors="pt", padding=True)
    sst2.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, sst2.model(**batch).logits)


def test_a_fine_tuned_model_continues_on_a_task_with_other_classes(sst2, tmp_path):
    """Megatron's habit (RTE from an MNLI model): the 2-class head of the SST-2 run is replaced by a new 3-class one,
    the encoder is the fine-tuned one."""
    run = finetune(GLUE / "mnli.yaml", sst2.output_dir / "final", tmp_path / "mnli", train_steps=3, eval_interval=0)
    assert run.model.classification_head.out_features == 3
    assert set(run.results["eval_splits"]) == {"validation_matched", "validation_mismatched"}
    assert run.results["split"] == "validation_matched"
    assert run.results["metrics"] == run.results["validation_matched"]
    assert sorted(run.results["predictions"].values()) == ["predictions/MNLI-m.tsv", "predictions/MNLI-mm.tsv"]


def test_an_adapter_folder_is_its_base_with_the_adapter_merged(base, lora, tmp_path, capsys):
    """`model` = the LoRA run's final/ (a peft adapter): its base (adapter_config.json) with the adapter merged in.
    With epochs 0 nothing is trained and the head the adapter trained scores the dev split and predicts the test split
    as the LoRA run did (its accuracy and predictions; the dev loss to 1e-5, merging changes only the order of the
    float32 sums). On a task with other classes the head is a new one, as for any fine-tuned folder."""
    adapter = lora.output_dir / "final"
    run = finetune(GLUE / "sst2.yaml", adapter, tmp_path / "predict", epochs=0, train_steps=0, warmup_steps=0)
    assert run.results["steps"] == 0 and run.results["metrics"] == lora.results["metrics"]
    assert run.results["dev_loss"]["validation"] == pytest.approx(lora.results["dev_loss"]["validation"], rel=1e-5)
    predictions = Path("predictions") / "SST-2.tsv"
    assert (tmp_path / "predict" / predictions).read_text() == (lora.output_dir / predictions).read_text()
    assert f"a peft adapter merged into its base {base}" in capsys.readouterr().out
    mnli = finetune(GLUE / "mnli.yaml", adapter, tmp_path / "mnli", train_steps=1, warmup_steps=0, eval_interval=0)
    assert mnli.model.classification_head.out_features == 3
    with pytest.raises(RecipeError, match=r"peft='qlora' quantizes pretrained weights as they load from a folder, but "
                                          r"model=.* is a peft adapter"):
        finetune(GLUE / "sst2.yaml", adapter, tmp_path / "never", peft="qlora")


def test_race_multiple_choice_learns_and_reports_levels(base, tmp_path):
    run = finetune(RACE, base, tmp_path / "race", max_seq_length=128)
    metrics = run.results["metrics"]
    assert metrics["accuracy"] >= above_chance(0.25, metrics["num_examples"]), metrics
    assert dev_losses(run)[-1] < 0.75 * math.log(4), dev_losses(run)
    assert {"accuracy_middle", "accuracy_high", "num_middle", "num_high"} <= set(metrics)
    assert metrics["num_middle"] + metrics["num_high"] == metrics["num_examples"]
    assert isinstance(run.model, megahf.MegatronBertForMultipleChoice)
    lines = (run.output_dir / "predictions" / "race_test.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and {line.split("\t")[1] for line in lines[1:]} <= set("ABCD")


LORA_RESUMABLE = {"peft": "lora", "learning_rate": 1e-2, "save_interval": 12, "log_interval": 1}


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    """LoRA (dropout 0.1 on the adapters) with a checkpoint at steps 12 and 24, every step's loss logged."""
    return finetune(GLUE / "sst2.yaml", base, tmp_path_factory.mktemp("lora") / "out", **LORA_RESUMABLE)


def test_lora_learns_and_its_adapter_reloads_with_peft(base, lora):
    from peft import PeftModel

    run = lora
    rows = len(run.trainer.data.evals["validation"][1])
    assert run.results["metrics"]["accuracy"] >= above_chance(0.5, rows), run.results
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classification_head" in n for n in trained), sorted(trained)
    assert any("linear_qkv.lora_A" in n for n in trained) and any("linear_fc1.lora_B" in n for n in trained)
    final = run.output_dir / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and "classification_head" in adapter["modules_to_save"]
    assert not (final / "model.safetensors").exists()  # the adapter only, not a copy of the base
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                                         final).eval()
    batch = run.tokenizer(["a wonderful day", "an awful day"], return_tensors="pt", padding=True)
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, run.model(**batch).logits)
    # the frozen encoder is the pretrained one, untouched
    pretrained = MegatronBertForPreTraining.from_pretrained(base).state_dict()
    qkv = "model.encoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(run.model.get_base_model().state_dict()[qkv.replace("weight", "base_layer.weight")],
                       pretrained[qkv])


def test_sigkill_then_the_same_command_ends_where_the_uninterrupted_run_ends(base, lora, tmp_path, capsys):
    """A LoRA run killed after step 13 and started again with the same command resumes from its checkpoint of step
    12 and ends bitwise where the uninterrupted run ended: every step's loss, the dev figures, the predictions and the
    adapter (dropout on: each random stream is restored with the weights). The checkpoint holds what training
    changes, not the frozen base."""
    out = tmp_path / "out"
    args = keys(base, out, **LORA_RESUMABLE)
    killed = launch([sys.executable, str(KILLED), "--kill_at_step", "13", str(GLUE / "sst2.yaml"), *args], "killed",
                    expect_success=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_0000012"]
    stored = SafeFileSystemReader(out / "checkpoints" / "step_0000012" / "model_optim").read_metadata()
    weights = [key for key in stored.state_dict_metadata if key.startswith("model.")]
    assert weights and all("lora_" in key or "modules_to_save" in key for key in weights), weights
    capsys.readouterr()
    run_finetune(load_finetune_recipe(GLUE / "sst2.yaml", args))  # the same command
    assert f"resuming from {out / 'checkpoints' / 'step_0000012'}" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == json.loads((lora.output_dir / "results.json").read_text())
    predictions = Path("predictions") / "SST-2.tsv"
    assert (out / predictions).read_bytes() == (lora.output_dir / predictions).read_bytes()
    assert losses(out) == losses(lora.output_dir) and sorted(losses(out)) == list(range(1, 25))
    got, expected = (load_file(o / "final" / "adapter_model.safetensors") for o in (out, lora.output_dir))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_8bit_adamw_learns_and_keeps_its_state_in_8_bits(base, tmp_path):
    run = finetune(GLUE / "sst2.yaml", base, tmp_path / "bnb", optim="adamw_bnb_8bit", eval_interval=0)
    rows = len(run.trainer.data.evals["validation"][1])
    assert run.results["metrics"]["accuracy"] >= above_chance(0.5, rows), run.results
    assert run.results["optim"] == "adamw_bnb_8bit"
    optimizer = run.trainer._torch_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes")
    qkv = run.model.model.encoder.layers[0].self_attention.linear_qkv.weight
    assert optimizer.state[qkv]["state1"].dtype == torch.uint8
    # Megatron's groups: no weight decay on biases and norm weights
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(qkv)] == 0.1 and decays[id(run.model.model.encoder.layers[0].self_attention.linear_qkv.bias)] == 0


def test_qlora_learns_sst2_on_a_4bit_base(base, tmp_path):
    import bitsandbytes as bnb

    run = finetune(GLUE / "sst2.yaml", base, tmp_path / "qlora", peft="qlora", learning_rate=1e-2, eval_interval=0)
    rows = len(run.trainer.data.evals["validation"][1])
    assert run.results["metrics"]["accuracy"] >= above_chance(0.5, rows), run.results
    assert dev_losses(run)[-1] < 0.75 * math.log(2), dev_losses(run)
    base_model = run.model.get_base_model()
    assert isinstance(base_model.model.encoder.layers[0].self_attention.linear_qkv.base_layer, bnb.nn.Linear4bit)
    assert not isinstance(base_model.classification_head.modules_to_save["default"], bnb.nn.Linear4bit)
    assert run.results["peft"] == "qlora" and (run.output_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def gpt_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt") / "final"
    config = MegatronGPTConfig.from_preset("gpt-tiny", num_layers=1, hidden_size=32, num_attention_heads=2,
                                           vocab_size=64)
    MegatronGPTForCausalLM(config).save_pretrained(folder)
    return folder


def test_bad_input_is_refused_before_anything_is_computed(base, gpt_folder, tmp_path):
    out = tmp_path / "never"
    cases = [
        (RACE, {"model": gpt_folder}, r"is a 'megatron_gpt' model.*race needs a BERT encoder"),
        (GLUE / "mnli.yaml", {"model": "gpt-tiny"}, r"model='gpt-tiny' is a GPT preset"),
        (GLUE / "sst2.yaml", {"max_seq_length": 256}, r"max_seq_length=256 exceeds the model's "
                                                      r"max_position_embeddings=128"),
        (GLUE / "sst2.yaml", {"task": "sst3"}, r"unknown task task='sst3'; did you mean 'sst2'"),
        (GLUE / "sst2.yaml", {"smoke": "false", "dataset": tmp_path / "nowhere"}, r"dataset=.*nowhere.*no such folder"),
        (GLUE / "sst2.yaml", {"peft": "qlora", "tensor_parallel_size": 2},
         r"peft='qlora' with tensor_parallel_size=2: bitsandbytes packs each 4-bit matrix whole"),
        (GLUE / "sst2.yaml", {"peft": "lora", "tensor_parallel_size": 2, "lora_dropout": 0.1},
         r"lora_dropout=0.1 with tensor_parallel_size=2: .*set lora_dropout: 0"),
        (GLUE / "sst2.yaml", {"optim": "sgd"}, r"optim='sgd' is invalid"),
        (GLUE / "sst2.yaml", {"optim": "adamw_bnb_8bit", "fsdp_size": 2},
         r"optim='adamw_bnb_8bit' with fsdp_size=2: bitsandbytes' 8-bit AdamW updates plain tensors"),
        (GLUE / "sst2.yaml", {"tensor_parallel_size": 2, "sequence_parallel": "true"},
         r"sequence_parallel=True: megahf finetune does not split sequences"),
        (GLUE / "sst2.yaml", {"epochs": 0, "train_steps": 0, "warmup_steps": 0},
         r"epochs=0 predicts with the model's own sst2 head, but model=.* has none"),
        (GLUE / "sst2.yaml", {"tokenizer": "gpt2-embedded"}, r"tokenizer='gpt2-embedded': the tokenizer has no cls, "
                                                             r"sep, pad token"),
        (GLUE / "sst2.yaml", {"lora_target_modules": "query", "peft": "lora"}, r"'query' names no linear layer.*"
                                                                                r"linear_qkv"),
    ]
    for recipe, extra, message in cases:
        with pytest.raises(RecipeError, match=message):
            finetune(recipe, base, out, **{k: str(v) for k, v in extra.items()})
    from megahf.hub import HubError  # a push that cannot happen (the tests run offline) stops before training

    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        finetune(GLUE / "sst2.yaml", base, out, push_to_hub="true", hub_model_id="alice/sst2")
    assert not out.exists()  # nothing was written
    with pytest.raises(RecipeError, match=r"model='runs/bert-336m/final': no such folder; pass --model"):
        load_finetune_recipe(GLUE / "mnli.yaml")


def test_cli_end_to_end_on_stsb(base, tmp_path):
    """`megahf finetune` as a user runs it, on STS-B (the regression head and its correlations)."""
    out = tmp_path / "stsb"
    done = launch([sys.executable, "-m", "megahf", "finetune", str(GLUE / "stsb.yaml"),
                   *keys(base, out, train_steps=12, eval_interval=0)], "megahf finetune stsb")
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"pearson", "spearmanr"} and results["task"] == "stsb"
    assert all(-1.0 <= v <= 1.0 for v in results["metrics"].values())
    assert "[megahf] done in" in done.stdout
    assert ("its other heads dropped (binary_head, lm_head, output_layer); task head classification_head newly "
            "initialised (1 output)") in done.stdout
    lines = (out / "predictions" / "STS-B.tsv").read_text().splitlines()
    float(lines[1].split("\t")[1])  # scores, not class ids


def test_cli_prints_a_bad_recipe_as_one_line(capsys):
    assert cli_main(["finetune", str(GLUE / "mnli.yaml"), "--model", "bert-tiny", "--lora_rank", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megahf finetune: error: recipe key lora_rank=0 is invalid") and "\n" not in err


@pytest.mark.parametrize("path", sorted(GLUE.glob("*.yaml")) + [RACE], ids=lambda p: p.stem)
def test_shipped_recipes_parse(path):
    recipe = load_finetune_recipe(path, ["--model", "bert-tiny"])
    assert recipe.task.task == path.stem
    assert (recipe.optim.lr_schedule, recipe.optim.weight_decay, recipe.optim.clip_grad) == ("linear", 0.1, 1.0)
    assert recipe.task.max_seq_length == (512 if path.stem == "race" else 128)


def test_paper_hyper_parameters():
    mnli = load_finetune_recipe(GLUE / "mnli.yaml", ["--model", "bert-tiny"])
    assert (mnli.parallel.global_batch_size, mnli.optim.learning_rate, mnli.task.epochs) == (128, 1e-5, 10)
    assert load_finetune_recipe(GLUE / "qqp.yaml", ["--model", "bert-tiny"]).task.epochs == 12
    race = load_finetune_recipe(RACE, ["--model", "bert-tiny"])
    assert (race.parallel.global_batch_size, race.optim.learning_rate, race.task.epochs) == (32, 2e-5, 3)
