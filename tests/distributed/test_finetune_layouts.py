"""`megahf finetune` under torchrun (gloo, 2 processes: DDP, FSDP2, tensor parallel) gives the dev metrics and
the fine-tuned weights of one process at the same global batch (one process: micro-batch 4 x accumulation 2).

The model is a tiny BERT saved as a pretraining run's final/ is, with dropout off (each rank would draw its own masks);
the data is the shipped SST-2 fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _launch import REPO_ROOT, final_weights, launch, torchrun_command
from finetune_helpers import save_tiny_pretrained_bert

RECIPE = REPO_ROOT / "recipes" / "glue" / "sst2.yaml"
LAYOUTS = {"single": (1, {}), "ddp2": (2, {}), "fsdp2": (2, {"fsdp_size": 2}),
           "tp2": (2, {"tensor_parallel_size": 2})}
# As for pretraining (test_training_layouts.py): the loss relative, the weights max |difference| relative to the
# largest weight of the model; a wrong layout is off by 1e-2 and more.
TOLERANCE = 1e-5
STEPS, LR, HEADS, HEAD_DIM = 8, 3e-3, 4, 16


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_pretrained_bert(tmp_path_factory.mktemp("pretrained") / "final")


@pytest.fixture(scope="module")
def layout_run(base, tmp_path_factory):
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            nproc, keys = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name) / "out"
            values = {"model": base, "output_dir": out, "smoke": "true", "micro_batch_size": 4,
                      "global_batch_size": 8, "learning_rate": LR, "train_steps": STEPS, "warmup_steps": 1,
                      "warmup_fraction": 0, "eval_interval": 4, "log_interval": 1, **keys}
            args = [token for key, value in values.items() for token in (f"--{key}", str(value))]
            entry = ["-m", "megahf", "finetune", str(RECIPE), *args]
            cmd = [sys.executable, *entry] if nproc == 1 else torchrun_command(nproc, *entry)
            result = launch(cmd, f"finetune {name}")
            (out / "output.txt").write_text(result.stdout)
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("layout", ["ddp2", "fsdp2", "tp2"])
def test_finetune_layout_equals_one_process(layout, layout_run):
    out, reference = layout_run(layout), layout_run("single")
    got = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert "2 processes" in got["layout"] and "global batch 8" in got["layout"], got["layout"]
    # the same dev predictions (accuracy counts rows) and the same dev loss
    assert got["metrics"] == expected["metrics"]
    assert got["dev_loss"]["validation"] == pytest.approx(expected["dev_loss"]["validation"], rel=TOLERANCE)
    assert (out / "predictions" / "SST-2.tsv").read_text() == (reference / "predictions" / "SST-2.tsv").read_text()
    output = (out / "output.txt").read_text()
    assert output.count("[megahf] done in") == 1 and output.count("smoke run") == 1, output[-3000:]
    got_weights, ref_weights = final_weights(out), final_weights(reference)
    assert got_weights.keys() == ref_weights.keys()
    # The key bias has an exactly zero gradient (adding it shifts every score of a query alike, and softmax ignores
    # that): what AdamW sees there is roundoff, which it normalises into steps of up to lr whichever layout summed it.
    # Those elements may drift apart by up to STEPS x LR; every other element must agree to TOLERANCE.
    for name in [n for n in ref_weights if n.endswith("linear_qkv.bias")]:
        got_k, ref_k = (w[name].view(HEADS, 3, HEAD_DIM)[:, 1].clone() for w in (got_weights, ref_weights))
        assert (got_k - ref_k).abs().max() <= STEPS * LR, name
        for w in (got_weights, ref_weights):
            w[name] = w[name].view(HEADS, 3, HEAD_DIM).clone()
            w[name][:, 1] = 0
    scale = max(ref.abs().max().item() for ref in ref_weights.values())
    errors = {n: (got_weights[n] - ref).abs().max().item() / scale for n, ref in ref_weights.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{layout}: {worst} off by {errors[worst]:.2e}"
