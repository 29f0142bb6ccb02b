"""The first pretraining path: recipes (YAML -> dataclass, overrides, early errors), data packing, a short run."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import datasets
import pytest
import torch
import yaml

import megahf  # noqa: F401  (registers MegatronGPT with the Auto classes)
from required import oracle
from megahf.training import PretrainRecipe, RecipeError, load_recipe, run_pretrain
from megahf.data.text_blocks import build_text_blocks, collate_blocks, split_documents
from megahf.training.setup import build_config, build_layout, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of the castle speak to the lords in the hall while the night "
         "falls on the town and the guards keep watch by the gate").split()


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0, key: str = "text") -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                         for _ in range(rng.randint(3, 6))]
            f.write(json.dumps({key: " ".join(sentences), "id": i}) + "\n")
    return path


def tiny_overrides(corpus: Path, output_dir: Path, **extra) -> list[str]:
    values = {
        "corpus": str(corpus), "output_dir": str(output_dir),
        "model_overrides.num_layers": 1, "model_overrides.hidden_size": 64,
        "seq_length": 32, "micro_batch_size": 4, "train_steps": 8, "warmup_steps": 1,
        "learning_rate": 3e-3, "min_learning_rate": 3e-4, "log_interval": 1, "eval_interval": 4,
        "valid_fraction": 0.2, "sample_prompt": "The king", "sample_tokens": 8, **extra,
    }
    tokens = []
    for key, value in values.items():
        tokens += [f"--{key}", str(value)]
    return tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    recipe = load_recipe(None, tiny_overrides(write_corpus(root / "corpus.jsonl"), root / "out",
                                              report_to="tensorboard"))
    return run_pretrain(recipe)


# ----------------------------------------------------------------------------- a short run


def test_loss_falls(run):
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 8
    assert math.log(50257) - 0.5 < losses[0] < math.log(50257) + 0.5  # a fresh model is near uniform
    assert losses[-1] < losses[0] - 1.0, losses


def test_metrics_json(run):
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert metrics["tokens_seen"] == 8 * 4 * 32
    for key in ("first_train_loss", "final_train_loss", "valid_loss", "valid_ppl", "tokens_per_second",
                "train_time_s", "wall_time_s"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["valid_ppl"] == pytest.approx(math.exp(metrics["valid_loss"]))
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["sample"].startswith("The king")
    # the process's peak resident set: at least the torch + transformers process it is (hundreds of MiB), less than
    # the machine
    assert 0.1 < metrics["peak_memory_gib"] < 64 and "ru_maxrss" in metrics["peak_memory_source"]
    assert metrics == run.metrics


def test_throughput_and_mfu_are_logged(run):
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    # positive only: the peak is timed at the start and the steps later, so a load that comes or goes in between can
    # put MFU anywhere (even above 1); what is exact is how it is computed
    assert metrics["mfu"] > 0 and metrics["peak_tflops"] > 0 and "measured" in metrics["peak_source"]
    assert metrics["mfu"] == pytest.approx(metrics["model_tflops_per_second"] / metrics["peak_tflops"])
    logged = [e for e in run.trainer.state.log_history if "loss" in e]
    assert all("tokens_per_second" in e and "mfu" in e for e in logged[1:])


def test_tensorboard_writes_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.output_dir.glob("runs/*/events.out.tfevents.*"))
    assert events, sorted(str(p) for p in run.output_dir.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_second", "train/mfu", "eval/loss"} <= tags, tags
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, 9))


def test_outputs_written(run):
    out = run.output_dir
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no partial files left
    saved = load_recipe(out / "recipe.yaml")
    assert saved.model.model_overrides == {"num_layers": 1, "hidden_size": 64}
    assert saved.optim.train_steps == 8


def test_final_checkpoint_reloads_with_auto_class(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run.output_dir / "final"
    trained = run.model.eval()
    loaded = AutoModelForCausalLM.from_pretrained(final).to(trained.device).eval()
    assert type(loaded).__name__ == "MegatronGPTForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tokenizer("The king and the queen speak")["input_ids"]], device=trained.device)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert loaded.config.num_layers == 1 and loaded.config.hidden_size == 64


def test_no_weight_decay_on_biases_and_norms(run):
    decayed = set(run.trainer.get_decay_parameter_names(run.model))
    names = {name for name, _ in run.model.named_parameters()}
    assert "model.embedding.word_embeddings.weight" in decayed
    assert "model.decoder.layers.0.self_attention.linear_qkv.weight" in decayed
    assert not any(n.endswith(".bias") or "layernorm" in n for n in decayed)
    assert "model.decoder.final_layernorm.weight" in names - decayed


def test_learning_rate_decays_to_min_lr(run):
    lrs = [e["learning_rate"] for e in run.trainer.state.log_history if "learning_rate" in e]
    assert max(lrs) == pytest.approx(3e-3, rel=0.05)
    # Trainer logs at step s the lr that step's update used, the schedule's value at s - 1: here step 7 of a cosine
    # from 3e-3 (after 1 warmup step) to 3e-4 at step 8.
    assert lrs[-1] == pytest.approx(3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * 6 / 7)))


@pytest.mark.parametrize("schedule, final_factor", [("linear", 0.1), ("cosine", 0.1), ("constant", 1.0)])
def test_schedules_end_at_min_lr(schedule, final_factor, tmp_path):
    from megahf.training.trainer import MegatronTrainer, training_arguments

    recipe = load_recipe(None, ["--lr_schedule", schedule, "--train_steps", "10", "--warmup_steps", "2",
                                "--learning_rate", "1e-3", "--min_learning_rate", "1e-4",
                                "--eval_interval", "0", "--output_dir", str(tmp_path)])
    trainer = MegatronTrainer(model=torch.nn.Linear(2, 2), args=training_arguments(recipe), recipe=recipe)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs = []
    for _ in range(11):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3 * final_factor)


# ----------------------------------------------------------------------------- data


def test_blocks_are_eod_separated_and_split_by_document(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=20)
    recipe = load_recipe(None, ["--corpus", str(corpus), "--seq_length", "16", "--valid_fraction", "0.25"])
    tokenizer = load_tokenizer(recipe)
    data = build_text_blocks(recipe.data, tokenizer, recipe.run.seed)
    assert (data.train_documents, data.valid_documents) == (15, 5)
    assert len(data.train) == data.train_tokens // 16 and len(data.valid) == data.valid_tokens // 16
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    train_docs, valid_docs = split_documents(datasets.Dataset.from_dict({"text": texts}), 0.25, recipe.run.seed)
    assert set(train_docs["text"]).isdisjoint(valid_docs["text"]) and len(valid_docs) == 5
    # The train stream is the train documents in corpus order, each followed by EOD, cut into blocks.
    eod = tokenizer.eos_token_id
    stream = [t for text in train_docs["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [eod]]
    train_ids = torch.cat([row["input_ids"] for row in data.train]).tolist()
    assert train_ids == stream[: len(train_ids)] and len(stream) - len(train_ids) < 16
    batch = collate_blocks([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])


def test_missing_text_key_names_file_key_and_fields(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", key="content")
    recipe = load_recipe(None, ["--corpus", str(corpus)])
    with pytest.raises(RecipeError, match=r"no field text_key='text'.*'content'.*set text_key"):
        build_text_blocks(recipe.data, load_tokenizer(recipe), recipe.run.seed)


def test_valid_split_without_a_block_says_how_to_fix(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=12)
    recipe = load_recipe(None, ["--corpus", str(corpus), "--seq_length", "256", "--valid_fraction", "0.1"])
    with pytest.raises(RecipeError, match=r"valid split .* fewer than one block of seq_length=256.*valid_fraction"):
        build_text_blocks(recipe.data, load_tokenizer(recipe), recipe.run.seed)


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    recipe = load_recipe(None, ["--corpus", str(empty)])
    with pytest.raises(RecipeError, match="no non-empty"):
        build_text_blocks(recipe.data, load_tokenizer(recipe), recipe.run.seed)


# ----------------------------------------------------------------------------- recipes


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_shipped_recipes_load():
    tiny = load_recipe(REPO_ROOT / "recipes" / "gpt" / "tiny.yaml")
    llama = load_recipe(REPO_ROOT / "recipes" / "gpt" / "llama-tiny.yaml")
    assert tiny.model.model == "gpt-tiny" and llama.model.model == "llama-tiny"
    assert tiny.data.corpus == "embedded" and tiny.data.tokenizer == "gpt2-embedded"


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {"lerning_rate": 1e-3})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'lerning_rate' in .*r\.yaml; did you mean "
                                          r"'learning_rate'\?"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"'trian_steps' on the command line.*did you mean '--train_steps'"):
        load_recipe(None, ["--trian_steps", "3"])


def test_wrong_type_names_key_value_and_fix(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {"train_steps": "many"})
    with pytest.raises(RecipeError, match=r"'train_steps' in .* must be an integer, got 'many'.*train_steps: 300"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"'train_steps' on the command line .*must be an integer, got '1.5'.*--train_steps 300"):
        load_recipe(None, ["--train_steps", "1.5"])
    with pytest.raises(RecipeError, match=r"'sequence_parallel'.*true or false, got 'maybe'"):
        load_recipe(None, ["--sequence_parallel", "maybe"])
    # The one recompute key: the old boolean is refused with its replacement named, from a file and the command line.
    with pytest.raises(RecipeError, match=r"activation_checkpointing=True .* was replaced: use recompute: full"):
        load_recipe(write_yaml(tmp_path / "old.yaml", {"activation_checkpointing": True}))
    with pytest.raises(RecipeError, match=r"activation_checkpointing=True on the command line.*recompute: full"):
        load_recipe(None, ["--activation_checkpointing"])
    with pytest.raises(RecipeError, match=r"recompute='some'.*none, selective, full"):
        load_recipe(None, ["--recompute", "some"])
    # Sequence parallelism: needs TP, a sequence the TP ranks can split, and the pre-LN order.
    with pytest.raises(RecipeError, match=r"sequence_parallel=True.*tensor_parallel_size=1; set tensor_parallel_size"):
        load_recipe(None, ["--sequence_parallel"])
    with pytest.raises(RecipeError, match=r"seq_length=127 is not divisible by tensor_parallel_size=2.*e\.g\. 126"):
        load_recipe(None, ["--sequence_parallel", "--tensor_parallel_size", "2", "--seq_length", "127"])
    with pytest.raises(RecipeError, match=r"sequence_parallel=True needs the pre-LayerNorm order.*'post'"):
        load_recipe(None, ["--sequence_parallel", "--tensor_parallel_size", "2", "--model", "bert-tiny",
                           "--tokenizer", "bert-uncased-embedded", "--model_overrides.layernorm_order", "post"])
    with pytest.raises(RecipeError, match=r"--seq_length needs a value"):
        load_recipe(None, ["--seq_length"])


def test_values_out_of_range_and_bad_models_fail_early(tmp_path):
    cases = [
        (["--valid_fraction", "1.5"], r"valid_fraction=1.5 is invalid"),
        (["--lr_schedule", "cosin"], r"lr_schedule='cosin' is invalid: use one of cosine, linear, constant"),
        (["--min_learning_rate", "1", "--learning_rate", "0.1"], r"min_learning_rate=1.0 is invalid"),
        (["--model", "gpt-tiy"], r"unknown model preset model='gpt-tiy'; did you mean 'gpt-tiny'"),
        (["--model_overrides.num_layer", "2"], r"model_overrides.num_layer=2; did you mean "
                                               r"'model_overrides.num_layers'"),
        (["--model_overrides.hidden_size", "130"], r"hidden_size=130 is invalid: .*divisible by num_attention_heads"),
        (["--seq_length", "512"], r"seq_length=512 exceeds the model's max_position_embeddings=256"),
        (["--corpus", str(tmp_path / "nope.jsonl")], r"corpus=.*nope.jsonl.*no such file"),
        (["--report_to", "wandb"], r"report_to='wandb' is invalid"),
    ]
    for overrides, message in cases:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, overrides)


def test_command_line_overrides_the_file(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {"train_steps": 300, "warmup_steps": 2, "learning_rate": "1e-3",  # YAML 1.1 string
                                            "model_overrides": {"num_layers": 2}})
    recipe = load_recipe(path, ["--train_steps", "12", "--learning-rate=2e-3", "--model_overrides.hidden_size", "64",
                                "--recompute", "selective", "--sample_prompt", "Romeo.\n"])
    assert isinstance(recipe, PretrainRecipe)
    assert recipe.optim.train_steps == 12 and recipe.optim.learning_rate == 2e-3
    assert recipe.model.model_overrides == {"num_layers": 2, "hidden_size": 64}
    assert recipe.model.recompute == "selective"
    assert recipe.run.sample_prompt == "Romeo.\n"
    config = build_config(recipe.model)
    assert (config.num_layers, config.hidden_size, config.recompute_granularity) == (2, 64, "selective")
    replaced = load_recipe(path, ["--model_overrides", "{hidden_size: 64}"])
    assert replaced.model.model_overrides == {"hidden_size": 64}


# ----------------------------------------------------------------------------- Megatron indexed data


def test_pretrain_from_indexed_data_blend(tmp_path):
    """`data_path` trains from `megahf preprocess` output, blended by weight, with Megatron's samples of
    seq_length + 1 tokens: the model sees the first seq_length tokens and is scored on the last seq_length."""
    from megahf.data import preprocess_corpus
    from megahf.data.pretraining_data import build_datasets, collate_samples

    prefixes = []
    for name, seed in (("a", 1), ("b", 2)):
        corpus = write_corpus(tmp_path / f"{name}.jsonl", n_docs=60, seed=seed)
        preprocess_corpus(input=str(corpus), json_keys=["text"], tokenizer="gpt2",
                          output_prefix=str(tmp_path / name), append_eod=True, workers=1)
        prefixes.append(str(tmp_path / f"{name}_text_document"))
    data_path = f"30 {prefixes[0]} 70 {prefixes[1]}"
    recipe = load_recipe(None, tiny_overrides(tmp_path / "a.jsonl", tmp_path / "out", data_path=data_path,
                                              split="90,10,0", data_cache_path=str(tmp_path / "cache")))
    data = build_datasets(recipe, load_tokenizer(recipe), build_layout(recipe, 1), build_config(recipe.model))
    assert data.collate is collate_samples
    assert len(data.train) >= recipe.optim.train_steps * recipe.parallel.micro_batch_size
    batch = collate_samples([data.train[i] for i in range(2)])
    assert batch["input_ids"].shape == batch["shift_labels"].shape == (2, recipe.data.seq_length)
    assert torch.equal(batch["input_ids"][:, 1:], batch["shift_labels"][:, :-1])

    result = run_pretrain(recipe)
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == recipe.optim.train_steps and losses[-1] < losses[0]
    assert math.isfinite(result.metrics["valid_loss"])


@pytest.mark.extended  # the same samples, without the recipe: tests/data/test_token_files.py (default tier)
def test_data_path_takes_a_datatrove_ds_file_and_draws_the_samples_of_megahf_preprocess(tmp_path):
    """A `.ds` written by datatrove's own DocumentTokenizer (nanotron's format) from the same texts as
    `megahf preprocess --append-eod`: the run's train and valid samples are the same token ids."""
    oracle("datatrove")
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer

    from megahf.assets import load_gpt2_tokenizer
    from megahf.data import preprocess_corpus
    from megahf.data.pretraining_data import build_datasets

    corpus = write_corpus(tmp_path / "a.jsonl", n_docs=60)
    preprocess_corpus(input=str(corpus), tokenizer="gpt2", output_prefix=str(tmp_path / "a"), append_eod=True,
                      progress=False)
    load_gpt2_tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    docs = [Document(text=json.loads(line)["text"], id=str(i)) for i, line in enumerate(corpus.open())]
    LocalPipelineExecutor([docs, DocumentTokenizer(str(tmp_path / "ds"), str(tmp_path / "tokenizer.json"),
                                                   eos_token="<|endoftext|>", shuffle_documents=False)],
                          workers=1, logging_dir=str(tmp_path / "logs")).run()
    samples = []
    for data_path in (str(tmp_path / "a_text_document"), str(tmp_path / "ds" / "00000_unshuffled.ds")):
        recipe = load_recipe(None, tiny_overrides(corpus, tmp_path / "out", data_path=data_path, split="90,10,0"))
        data = build_datasets(recipe, load_tokenizer(recipe), build_layout(recipe, 1), build_config(recipe.model))
        samples.append([[split[i]["input_ids"].tolist() for i in range(len(split))]
                        for split in (data.train, data.valid)])
    assert samples[0] == samples[1] and len(samples[0][0]) >= 32


def test_data_path_that_does_not_exist_is_refused_before_training(tmp_path):
    with pytest.raises(RecipeError, match="data_path"):
        load_recipe(None, tiny_overrides(tmp_path / "a.jsonl", tmp_path / "out", data_path=str(tmp_path / "nope")))
