"""Long context: `megahf pretrain` at sequence 4096 with tensor parallelism 2 and Megatron's sequence parallelism
equals one process, for the Llama shape (RoPE) and the GPT-2 shape (a table of 4096 learned positions).

A tiny hidden size (64, 2 layers, 4 heads) keeps a 4096-token step cheap on CPU; what is long is the sequence, which
sequence parallelism splits between the two ranks (each norm and dropout sees 2048 positions) and attention sees
whole. Two steps of a global batch of 2 samples on the shipped Shakespeare corpus (as indexed data), dropout off (the
layouts draw their masks differently): every step's loss and every final weight within 1e-5 relative, the
tolerance of every layout test (tests/distributed/test_training_layouts.py says why); a wrong split of the sequence
is off by far more. Both in the extended tier (a 4096-token step of a 50k vocabulary is seconds of CPU per rank).
"""

from __future__ import annotations

import json

import pytest

from _launch import final_weights, losses, run_pretrain_cli
from megahf.assets import corpus_path
from megahf.data.preprocess import preprocess_corpus

STEPS = 2
TOLERANCE = 1e-5
MODELS = {"llama": {"model": "llama-tiny"},
          "gpt": {"model": "gpt-tiny", "model_overrides.hidden_dropout": 0.0,
                  "model_overrides.attention_dropout": 0.0}}
LAYOUTS = {"single": (1, {}), "tp2-sp": (2, {"tensor_parallel_size": 2, "sequence_parallel": True})}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return preprocess_corpus(str(corpus_path()), str(tmp_path_factory.mktemp("data") / "shakespeare"),
                             tokenizer="gpt2", append_eod=True, progress=False).prefixes["text"]


def run(model: str, layout: str, data_path: str, out) -> None:
    nproc, keys = LAYOUTS[layout]
    values = {**MODELS[model], "model_overrides.num_layers": 2, "model_overrides.hidden_size": 64,
              "model_overrides.num_attention_heads": 4, "model_overrides.num_query_groups": 4,
              "model_overrides.max_position_embeddings": 4096, "data_path": data_path, "split": "90,10,0",
              "seq_length": 4096, "micro_batch_size": 1, "global_batch_size": 2, "train_steps": STEPS,
              "save_interval": STEPS, "warmup_steps": 1, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
              "log_interval": 1, "eval_interval": 0, "eval_iters": 1, "sample_tokens": 0, "peak_tflops": 1.0,
              "output_dir": out, **keys}
    run_pretrain_cli(nproc, [t for k, v in values.items() for t in (f"--{k}", str(v))])


@pytest.mark.extended
@pytest.mark.parametrize("model", list(MODELS))
def test_a_4096_token_step_with_sequence_parallelism_equals_one_process(model, data_path, tmp_path):
    run(model, "single", data_path, tmp_path / "single")
    run(model, "tp2-sp", data_path, tmp_path / "tp2-sp")
    assert "tensor parallel 2 (sequence parallel)" in json.loads((tmp_path / "tp2-sp" / "metrics.json").read_text())[
        "layout"]
    got, expected = losses(tmp_path / "tp2-sp"), losses(tmp_path / "single")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected) <= TOLERANCE, (got, expected)
    got_weights, ref_weights = final_weights(tmp_path / "tp2-sp"), final_weights(tmp_path / "single")
    assert got_weights.keys() == ref_weights.keys()
    scale = max(ref.abs().max().item() for ref in ref_weights.values())
    worst = max((got_weights[n] - ref).abs().max().item() / scale for n, ref in ref_weights.items())
    assert worst <= TOLERANCE, worst
