"""Continued pretraining (`megahf pretrain --model FOLDER`) under tensor parallelism and TP x FSDP2, against one
process: a transformers Llama (grouped-query attention), a transformers GPT-2, a megahf folder and a transformers BERT
(masked LM). Each layout's run (`_continue_worker.py`: the CLI's run with a check of the model it loaded) shows:

* loading: each rank's shards equal the folder's tensors bit for bit, each rank read from the files exactly the
  elements it keeps and never a whole tensor, and the sharded model's logits equal those of the folder's own model
  run by transformers (1e-5 of the largest logit: the same weights, computed in another order);
* training: every step's loss (3 steps, global batch 8) equals one process's (1e-5 relative, the tolerance of every
  layout test: only the order of the reductions differs; a wrong shard is off by far more).

The default tier continues the Llama at one process and TP=2; the other folders and TP=2 x FSDP=2 repeat the same
loader and training loop (extended tier; every converted tensor's blocks are checked in one process by
tests/test_continue_pretraining.py)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _launch import RECIPE, launch, losses, run_pretrain_cli, torchrun_command, write_corpus
from megahf.data.preprocess import preprocess_corpus

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
def data(tmp_path_factory):
    """The recipe keys of each kind's data: the GPTs read indexed data tokenized once with GPT-2's BPE (its tokenizer
    record matches the checkpoints' own tokenizer: the same vocabulary in another folder); BERT the corpus."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=60)
    prefix = preprocess_corpus(str(corpus), str(root / "gpt2"), tokenizer="gpt2", append_eod=True,
                               progress=False).prefixes["text"]
    return {kind: {"corpus": corpus} if kind == "bert" else {"data_path": prefix, "split": "80,20,0"}
            for kind in FOLDERS}


@pytest.fixture(scope="module")
def continued(folders, data, tmp_path_factory):
    """Output folder of `megahf pretrain --model FOLDER` for (kind, layout), run once per session: one process by the
    CLI, the layouts by the worker (the CLI's run with the check of the loaded model, whose report it writes)."""
    done = {}

    def get(kind: str, layout: str) -> Path:
        if (kind, layout) not in done:
            nproc, keys = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"{kind}-{layout}") / "out"
            # peak_tflops given: no start-up measurement of the CPU's matmul rate (the MFU figure is not compared)
            values = {"model": folders / kind, "tokenizer": folders / kind, **data[kind], "output_dir": out,
                      "seq_length": 32, "micro_batch_size": 4, "global_batch_size": 8, "train_steps": STEPS,
                      "save_interval": STEPS, "warmup_steps": 1, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
                      "log_interval": 1, "eval_interval": 0, "valid_fraction": 0.2, "eval_iters": 1,
                      "sample_tokens": 0, "peak_tflops": 1.0, **RUN_KEYS[kind], **keys}
            args = [t for k, v in values.items() for t in (f"--{k}", str(v))]
            if nproc == 1:
                result = run_pretrain_cli(1, args)
            else:
                report = out.parent / "report.json"
                command = torchrun_command(nproc, str(WORKER), str(RECIPE), "--report", str(report), *args)
                result = launch(command, f"continued pretraining of {kind} at {layout}")
                (out / "report.json").write_text(report.read_text())
            assert f"continuing the pretraining of {folders / kind}" in result.stdout, result.stdout[-3000:]
            done[(kind, layout)] = out
        return done[(kind, layout)]

    return get


@pytest.mark.parametrize("kind, layout", [
    pytest.param(kind, layout, marks=[] if (kind, layout) in DEFAULT_RUNS else [pytest.mark.extended])
    for kind in FOLDERS for layout in ("tp2", "tp2xfsdp2")])
def test_continued_pretraining_loads_each_shard_and_equals_one_process(kind, layout, continued):
    out = continued(kind, layout)
    report = json.loads((out / "report.json").read_text())
    assert report["unequal_shards"] == 0, report
    assert report["whole_tensor_reads"] == 0, report
    assert report["ranks_reading_other_than_they_keep"] == 0, report
    assert report["max_read_elements"] == report["max_kept_elements"] > 0, report
    assert report["logit_error"] <= TOLERANCE, report
    got, expected = losses(out), losses(continued(kind, "single"))
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    errors = {step: abs(got[step] - expected[step]) / abs(expected[step]) for step in expected}
    assert max(errors.values()) <= TOLERANCE, (got, expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and f"{LAYOUTS[layout][0]} processes" in metrics["layout"]
