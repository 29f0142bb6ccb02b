"""What the Hub tests share besides fixtures: the fake token, the environment of a process that talks to the
stand-in, tiny trained models and the run folder megahf pretrain would leave."""

from __future__ import annotations

import json
import os
from pathlib import Path

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


def subprocess_env(hub, home: Path) -> dict[str, str]:
    """The environment of a fresh process that talks to the stand-in: no megahf on the path, its own cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                             "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_TOKEN=FAKE_TOKEN,
               HF_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1",
               MEGAHF_HUB_RETRY_DELAY="0.01")
    return env


def _train(model, batch: dict, steps: int = 3) -> None:
    """A few optimizer steps, so that the weights are a trained model's, not an initialisation's."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def tiny_gpt():
    import torch
    from megahf.models.gpt import MegatronGPTConfig, MegatronGPTForCausalLM

    torch.manual_seed(0)
    config = MegatronGPTConfig(vocab_size=50257, hidden_size=32, num_layers=2, num_attention_heads=2,
                               max_position_embeddings=64)
    model = MegatronGPTForCausalLM(config)
    ids = torch.randint(0, 50257, (2, 16))
    _train(model, {"input_ids": ids, "labels": ids})
    return model


def tiny_bert():
    import torch
    from megahf.models.bert import MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(1)
    config = MegatronBertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=2,
                                max_position_embeddings=64)
    model = MegatronBertForPreTraining(config)
    ids = torch.randint(1000, 30522, (2, 16))
    _train(model, {"input_ids": ids, "labels": ids, "next_sentence_label": torch.tensor([0, 1])})
    return model


GPT_INPUT = [[464, 3290, 318, 257, 1332, 286, 262, 11, 290, 340]]
BERT_INPUT = [[101, 1996, 2332, 2003, 103, 1012, 102]]


def write_gpt_run(folder: Path, model) -> Path:
    """A `megahf pretrain` output_dir: final/, metrics.json, loss.png, recipe.yaml, and evaluations in eval/."""
    import yaml
    from megahf.assets import load_gpt2_tokenizer
    from megahf.training.outputs import plot_losses

    folder.mkdir(parents=True)
    model.save_pretrained(folder / "final")
    load_gpt2_tokenizer().save_pretrained(folder / "final")
    metrics = {"model": "gpt-tiny", "parameters": sum(p.numel() for p in model.parameters()),
               "layout": "1 process", "steps": 3, "tokens_seen": 96, "epochs": 0.5, "first_train_loss": 10.9,
               "final_train_loss": 9.8, "valid_loss": 9.9, "valid_ppl": 19930.4, "tokens_per_second": 1234.5,
               "model_tflops_per_second": 0.001, "peak_tflops": 0.5, "peak_source": "measured fp32 matmul",
               "mfu": 0.002, "train_time_s": 1.5, "device": "cpu", "resumed_from": None, "sample": "ROMEO: x",
               "wall_time_s": 4.2}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses([{"step": 1, "loss": 10.9}, {"step": 3, "loss": 9.8}, {"step": 3, "eval_loss": 9.9}],
                folder / "loss.png", "tiny")
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": "gpt-tiny", "tokenizer": "gpt2-embedded",
                                                        "corpus": "embedded", "seq_length": 16, "train_steps": 3}))
    (folder / "eval").mkdir()
    (folder / "eval" / "lambada.json").write_text(json.dumps({
        "accuracy": 0.0123, "correct": 63, "total": 5153, "strict": False, "task": "lambada",
        "model": str(folder / "final"), "data": "EleutherAI/lambada_openai", "seq_length": 64}))
    (folder / "eval" / "wikitext.json").write_text(json.dumps({
        "loss": 9.87, "perplexity": 19341.2, "adjusted_perplexity": 73012.5, "num_original_tokens": 245569,
        "num_tokenized_tokens": 287644, "task": "wikitext", "model": str(folder / "final"),
        "data": "Salesforce/wikitext (wikitext-103-raw-v1)"}))
    (folder / "eval" / "lambada-fixture.json").write_text(json.dumps({
        "accuracy": 0.5, "correct": 1, "total": 2, "strict": True, "task": "lambada",
        "data": "src/megahf/assets/fixtures/lambada_openai.jsonl"}))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and mtime, to prove a push left it untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}
