"""`megahf evaluate lambada|wikitext` under torchrun (gloo, 2 CPU processes) at data parallel 2 and at tensor
parallel 2 gives the figures of one process: LAMBADA's counts exactly, WikiText's token counts exactly and its loss
up to float32 roundoff."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from _launch import REPO_ROOT, launch, torchrun_command

sys.path.insert(0, str(REPO_ROOT / "tests" / "tasks"))
from task_helpers import FIXTURES, fitted_gpt, run_cli  # noqa: E402

from megahf.assets import load_gpt2_tokenizer  # noqa: E402
from megahf.tasks import lambada  # noqa: E402

WORKER = Path(__file__).with_name("_evaluate_worker.py")
FLOAT32_EPS = torch.finfo(torch.float32).eps


def evaluations(model: Path) -> dict[str, str]:
    """Name -> `megahf evaluate` arguments. Micro batches of 3 make ragged batches on every layout; WikiText's
    16-token windows sliding by 8 make 15 windows, the last one ragged."""
    lambada_args = f"lambada --model {model} --data {FIXTURES / 'lambada_openai.jsonl'} --micro-batch-size 3"
    return {
        "lambada": lambada_args,
        "lambada-strict": lambada_args + " --strict",
        "wikitext": f"wikitext --model {model} --data {FIXTURES / 'wiki.test.raw'} --seq-length 16 "
                    "--overlapping-eval 8 --micro-batch-size 3",
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny GPT (2 heads, hidden 32) fitted to half of the fixture's last words: it gets some passages right."""
    texts = lambada.load_texts(FIXTURES / "lambada_openai.jsonl")
    folder = tmp_path_factory.mktemp("evaluate-parallel") / "model"
    fitted_gpt(texts, load_gpt2_tokenizer()).save_pretrained(folder)
    return folder


def test_data_and_tensor_parallel_equal_one_process(model_folder, tmp_path, capsys):
    runs = evaluations(model_folder)
    expected = {}
    for name, argv in runs.items():
        out = tmp_path / f"{name}-one.json"
        status, _, err = run_cli(["evaluate", *argv.split(), "--output-json", str(out), "--no-progress"], capsys)
        assert status == 0, err
        expected[name] = json.loads(out.read_text())
    assert 0 < expected["lambada"]["correct"] < expected["lambada"]["total"]  # neither all right nor all wrong

    cmd = torchrun_command(2, str(WORKER), "--tensor-parallel-sizes", "1,2", "--out", str(tmp_path),
                           *(f"--evaluation={name}:{argv}" for name, argv in runs.items()))
    done = launch(cmd, "megahf evaluate under torchrun (DP=2, then TP=2)")
    for tp, dp in ((1, 2), (2, 1)):
        for name, one in expected.items():
            got = json.loads((tmp_path / f"{name}-tp{tp}.json").read_text())
            assert (got["tensor_parallel_size"], got["data_parallel_size"]) == (tp, dp)
            if name.startswith("lambada"):
                assert (got["correct"], got["total"], got["strict"]) == (one["correct"], one["total"], one["strict"])
                continue
            assert got["num_tokenized_tokens"] == one["num_tokenized_tokens"]
            assert got["num_original_tokens"] == one["num_original_tokens"]
            # Each window's NLL is a float32 sum of per-token cross entropies whose last bits depend on the batch
            # it ran in (another padding width, other rows) and, under TP, on the order of the all-reduced partial
            # sums; the windows' float64 sums are then added in the same order. A few float32 ulps per token,
            # all of one sign at worst, move the mean loss by at most ~n ulps of it: 16 ulps of the loss is
            # generous for these 2-layer, hidden-32 reductions and still 1e5 times tighter than any real change.
            assert math.isclose(got["loss"], one["loss"], rel_tol=16 * FLOAT32_EPS), (tp, got["loss"], one["loss"])
    # rank 0 alone prints: one table per evaluation and layout
    assert done.stdout.count("megahf evaluate lambada\n") == 4
    assert done.stdout.count("megahf evaluate wikitext\n") == 2
