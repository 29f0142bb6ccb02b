"""Continued pretraining (`megahf pretrain --model FOLDER`) under tensor parallelism and TP x FSDP2, against one
process: a transformers Llama (grouped-query attention), a transformers GPT-2, a megahf folder and a transformers BERT
(masked LM).

* Loading (`_continue_worker.py`, every folder in one launch per layout): each rank's shards equal the folder's tensors
  bit for bit, each rank read from the files exactly the elements it keeps and never a whole tensor, and the sharded
  model's logits equal those of the folder's own model run by transformers (1e-5 of the largest logit: the same
  weights, computed in another order).
* Training: every step's loss of the same run (3 steps, global batch 8) at TP=2 and TP=2 x FSDP=2 equals one
  process's (1e-5 relative, the tolerance of every layout test: only the order of the reductions differs; a wrong
  shard is off by far more).

The default tier loads every folder at TP=2 and continues the Llama at one process and TP=2; the other layouts and
folders repeat the same loader and training loop (extended tier).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _launch import losses, run_pretrain_cli, write_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continue_helpers import FOLDERS, RUN_KEYS, make_folder  # noqa: E402

WORKER = Path(__file__).with_name("_continue_worker.py")
STEPS = 3
TOLERANCE = 1e-5
LAYOUTS = {"single": (1, {}), "tp2": (2, {"tensor_parallel_size": 2}),
           "tp2xfsdp2": (4, {"tensor_parallel_size": 2, "fsdp_size": 2})}
DEFAULT_RUNS = {("llama", "tp2")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for kind in FOLDERS:
        make_folder(kind, root)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n_docs=60)


@pytest.mark.parametrize("layout", ["tp2", pytest.param("tp2xfsdp2", marks=pytest.mark.extended)])
def test_each_rank_loads_exactly_its_shards_of_the_folder(layout, folders, torchrun, tmp_path):
    nproc, keys = LAYOUTS[layout]
    args = ["--root", str(folders), "--kinds", ",".join(FOLDERS)]
    for key, value in keys.items():
        args += [f"--{key}", str(value)]
    report = torchrun(nproc, args, tmp_path / "report.json", worker=WORKER)
    for kind in FOLDERS:
        result = report[kind]
        assert f"{nproc} processes" in result["layout"], result
        assert result["unequal_shards"] == 0, (kind, result)
        assert result["whole_tensor_reads"] == 0, (kind, result)
        assert result["ranks_reading_other_than_they_keep"] == 0, (kind, result)
        assert result["max_read_elements"] == result["max_kept_elements"] > 0, (kind, result)
        assert result["logit_error"] <= TOLERANCE, (kind, result)


@pytest.fixture(scope="module")
def continued(folders, corpus, tmp_path_factory):
    """Output folder of `megahf pretrain --model FOLDER` for (kind, layout), run once per session."""
    done = {}

    def get(kind: str, layout: str) -> Path:
        if (kind, layout) not in done:
            nproc, keys = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"{kind}-{layout}") / "out"
            values = {"model": folders / kind, "tokenizer": folders / kind, "corpus": corpus, "output_dir": out,
                      "seq_length": 32, "micro_batch_size": 4, "global_batch_size": 8, "train_steps": STEPS,
                      "save_interval": STEPS, "warmup_steps": 1, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
                      "log_interval": 1, "eval_interval": 0, "valid_fraction": 0.2, "sample_tokens": 0,
                      **RUN_KEYS[kind], **keys}
            result = run_pretrain_cli(nproc, [t for k, v in values.items() for t in (f"--{k}", str(v))])
            assert f"continuing the pretraining of {folders / kind}" in result.stdout, result.stdout[-3000:]
            done[(kind, layout)] = out
        return done[(kind, layout)]

    return get


@pytest.mark.parametrize("kind, layout", [
    pytest.param(kind, layout, marks=[] if (kind, layout) in DEFAULT_RUNS else [pytest.mark.extended])
    for kind in FOLDERS for layout in ("tp2", "tp2xfsdp2")])
def test_continued_pretraining_equals_one_process(kind, layout, continued):
    got, expected = losses(continued(kind, layout)), losses(continued(kind, "single"))
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    errors = {step: abs(got[step] - expected[step]) / abs(expected[step]) for step in expected}
    assert max(errors.values()) <= TOLERANCE, (got, expected)
    metrics = json.loads((continued(kind, layout) / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and str(LAYOUTS[layout][0]) in metrics["layout"]
