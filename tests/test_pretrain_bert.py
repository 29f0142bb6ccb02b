"""`megahf pretrain` with a BERT preset: sentence-split data built from a corpus, Megatron's BERT samples, masked LM +
sentence order, the end-of-run validation and fill-mask sample, and the errors that guard it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForPreTraining

import megahf
from megahf.assets import load_bert_tokenizer, load_gpt2_tokenizer
from megahf.training import RecipeError, load_recipe, run_pretrain
from megahf.data.bert_pretraining_data import build_bert_data, collate_bert
from megahf.training.setup import build_config, build_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the king and queen of the castle speak to the lords in the hall while night falls on the town".split()


def write_corpus(path: Path, n_docs: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + "."
                         for _ in range(rng.randint(3, 7))]
            f.write(json.dumps({"text": " ".join(sentences), "id": i}) + "\n")
    return path


def overrides(corpus: Path, output_dir: Path, **extra) -> list[str]:
    values = {
        "corpus": str(corpus), "output_dir": str(output_dir), "model_overrides.num_layers": 2,
        "model_overrides.hidden_size": 64, "seq_length": 32, "micro_batch_size": 4, "train_steps": 12,
        "warmup_steps": 1, "learning_rate": 3e-3, "min_learning_rate": 3e-4, "log_interval": 1,
        "eval_interval": 6, "eval_iters": 2, "split": "80,20,0",
        "sample_prompt": "The king [MASK] the queen.", **extra,
    }
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-pretrain")
    recipe = load_recipe(REPO_ROOT / "recipes" / "bert" / "tiny.yaml",
                         overrides(write_corpus(root / "corpus.jsonl"), root / "out"))
    return run_pretrain(recipe)


def test_bert_run_trains_masked_lm_and_sentence_order(run):
    assert isinstance(run.model, megahf.MegatronBertForPreTraining)
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    # masked LM and sentence order reported apart, the total is their sum, the perplexity the masked LM's
    assert metrics["valid_loss"] == pytest.approx(metrics["valid_mlm_loss"] + metrics["valid_sop_loss"])
    assert metrics["valid_ppl"] == pytest.approx(torch.tensor(metrics["valid_mlm_loss"]).exp().item(), rel=1e-6)
    assert 0.0 <= metrics["valid_sop_accuracy"] <= 1.0
    assert metrics["valid_mlm_loss"] < 10.0  # from ln(30522) = 10.3 at init
    # the fill-mask sample lists sample_top_k words at the [MASK]
    assert metrics["sample"].startswith("The king [MASK] the queen.")
    assert metrics["sample"].count("(") == 5


def test_bert_final_checkpoint_reloads(run):
    final = run.output_dir / "final"
    model = AutoModelForPreTraining.from_pretrained(final).eval()
    assert isinstance(model, megahf.MegatronBertForPreTraining)
    tokenizer = load_bert_tokenizer()
    batch = tokenizer("the king speaks.", "the queen listens.", return_tensors="pt")
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).prediction_logits, run.model(**batch).prediction_logits)
    # the data was preprocessed once into output_dir/data (sentence-split indexed data and the sample cache)
    assert list((run.output_dir / "data").glob("*_text_sentence.idx"))


def test_samples_come_from_megatrons_bert_dataset(tmp_path):
    tokenizer = load_bert_tokenizer()
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    kwargs = dict(tokenizer=tokenizer, seq_length=32, seed=7, split="80,20,0", train_samples=20, valid_samples=4,
                  cache_dir=tmp_path / "cache", corpus=str(corpus))
    data = build_bert_data(**kwargs)
    assert len(data.train) >= 20 and len(data.valid) >= 4
    batch = collate_bert([data.train[i] for i in range(3)])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}
    assert torch.all(batch["input_ids"][:, 0] == tokenizer.cls_token_id)
    masked = batch["labels"] != -100
    assert masked.any() and torch.all(batch["attention_mask"][masked] == 1)
    # built once: a second call reads the same files and gives the same samples
    idx = next((tmp_path / "cache").glob("*_text_sentence.idx"))
    stamp = idx.stat().st_mtime_ns
    again = build_bert_data(**kwargs)
    assert idx.stat().st_mtime_ns == stamp
    assert torch.equal(collate_bert([again.train[i] for i in range(3)])["input_ids"], batch["input_ids"])


def test_bert_needs_a_wordpiece_tokenizer(tmp_path):
    with pytest.raises(RecipeError, match=r"tokenizer='gpt2-embedded' does not fit model='bert-tiny'.*"
                                          r"bert-uncased-embedded"):
        load_recipe(REPO_ROOT / "recipes" / "bert" / "tiny.yaml", ["--tokenizer", "gpt2-embedded"])
    with pytest.raises(RecipeError, match=r"the tokenizer has no cls token"):
        build_bert_data(tokenizer=load_gpt2_tokenizer(), seq_length=32, seed=1, split="80,20,0", train_samples=1,
                        valid_samples=1, cache_dir=tmp_path, corpus=str(write_corpus(tmp_path / "c.jsonl")))


def test_bert_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"model_overrides.num_query_groups.*MegatronBertConfig fields"):
        load_recipe(REPO_ROOT / "recipes" / "bert" / "tiny.yaml", ["--model_overrides.num_query_groups", "2"])
    with pytest.raises(RecipeError, match=r"mask_prob=1.5 is invalid"):
        load_recipe(REPO_ROOT / "recipes" / "bert" / "tiny.yaml", ["--mask_prob", "1.5"])
    with pytest.raises(RecipeError, match=r"seq_length=600 exceeds the model's max_position_embeddings=512"):
        load_recipe(REPO_ROOT / "recipes" / "bert" / "tiny.yaml", ["--seq_length", "600"])
    with pytest.raises(RecipeError, match=r"unknown model preset model='bert-tinyy'.*did you mean 'bert-tiny'"):
        load_recipe(None, ["--model", "bert-tinyy"])


@pytest.mark.parametrize("name", ["tiny", "bert-336m", "bert-1.3b", "bert-3.9b"])
def test_shipped_bert_recipes_load_and_fit_a_node(name):
    recipe = load_recipe(REPO_ROOT / "recipes" / "bert" / f"{name}.yaml")
    assert recipe.data.tokenizer == "bert-uncased-embedded" and recipe.model.model.startswith("bert-")
    assert build_config(recipe.model).layernorm_order == "pre"
    if name != "tiny":  # the paper's schedule: batch 1024, lr 1e-4, 10k warm-up, linear decay over 2M steps
        optim = recipe.optim
        assert (recipe.parallel.global_batch_size, optim.learning_rate, optim.warmup_steps, optim.train_steps,
                optim.lr_schedule, recipe.data.seq_length) == (1024, 1e-4, 10_000, 2_000_000, "linear", 512)
    layout = build_layout(recipe, 8)  # one node of 8 GPUs
    assert layout.global_batch_size == (recipe.parallel.global_batch_size or layout.global_batch_size)
