"""`megahf finetune` under torchrun (gloo: DDP, FSDP2, tensor parallel, TP x FSDP2) gives the dev metrics, the losses of
every step and the fine-tuned weights of one process at the same global batch: full fine-tuning, LoRA (its adapters
sharded with their base layers) and QLoRA (its 4-bit storage sharded by FSDP2); and a LoRA run killed under a layout
resumes exactly.

The model is a tiny BERT saved as a pretraining run's final/ is, with dropout off (each rank would draw its own masks);
the data is the shipped SST-2 fixture (RACE's for its multiple-choice head).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _launch import REPO_ROOT, final_weights, launch, losses, torchrun_command
from finetune_helpers import above_chance, save_tiny_pretrained_bert

RECIPE = REPO_ROOT / "recipes" / "glue" / "sst2.yaml"
RACE = {"recipe": REPO_ROOT / "recipes" / "race" / "race.yaml", "max_seq_length": 128}
KILLED = Path(__file__).with_name("_finetune_killed.py")
# As for pretraining (test_training_layouts.py): the loss relative, the weights max |difference| relative to the
# largest weight of the model; a wrong layout is off by 1e-2 and more.
TOLERANCE = 1e-5
STEPS, SAVE, LR, HEADS, HEAD_DIM = 8, 4, 3e-3, 4, 16
LORA = {"peft": "lora", "lora_dropout": 0}
# QLoRA trains longer: its runs must also learn the fixture (dev accuracy above chance + 4 standard deviations).
QLORA = {"peft": "qlora", "lora_dropout": 0, "train_steps": 24, "learning_rate": 1e-2, "eval_interval": 12,
         "save_interval": 12}
RUNS = {  # name: (processes, recipe keys); micro-batch 4, global batch 8
    "single": (1, {}), "ddp2": (2, {}), "fsdp2": (2, {"fsdp_size": 2}), "tp2": (2, {"tensor_parallel_size": 2}),
    # one micro-batch of 8: the layouts accumulate two (TP) or split the batch over two ranks, and must not differ
    "lora-single": (1, {**LORA, "micro_batch_size": 8}), "lora-ddp2": (2, LORA),
    "lora-fsdp2": (2, {**LORA, "fsdp_size": 2}), "lora-tp2": (2, {**LORA, "tensor_parallel_size": 2}),
    "lora-tp2xfsdp2": (4, {**LORA, "tensor_parallel_size": 2, "fsdp_size": 2}),
    "qlora-single": (1, {**QLORA, "micro_batch_size": 8}), "qlora-fsdp2": (2, {**QLORA, "fsdp_size": 2}),
    "race-lora-single": (1, {**RACE, **LORA, "micro_batch_size": 8}),
    "race-lora-tp2xfsdp2": (4, {**RACE, **LORA, "tensor_parallel_size": 2, "fsdp_size": 2}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_pretrained_bert(tmp_path_factory.mktemp("pretrained") / "final")


def run_args(base: Path, out: Path, keys: dict) -> list[str]:
    values = {"model": base, "output_dir": out, "smoke": "true", "micro_batch_size": 4, "global_batch_size": 8,
              "learning_rate": LR, "train_steps": STEPS, "warmup_steps": 1, "warmup_fraction": 0, "eval_interval": 4,
              "log_interval": 1, "save_interval": SAVE, **keys}
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def command(nproc: int, *entry: str) -> list[str]:
    return [sys.executable, *entry] if nproc == 1 else torchrun_command(nproc, *entry)


@pytest.fixture(scope="module")
def layout_run(base, tmp_path_factory):
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            nproc, keys = RUNS[name]
            keys = dict(keys)
            recipe = keys.pop("recipe", RECIPE)
            out = tmp_path_factory.mktemp(name) / "out"
            result = launch(command(nproc, "-m", "megahf", "finetune", str(recipe), *run_args(base, out, keys)),
                            f"finetune {name}")
            (out / "output.txt").write_text(result.stdout)
            done[name] = out
        return done[name]

    return get


def assert_same_dev_figures(out: Path, reference: Path, processes: int) -> None:
    got = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert f"{processes} processes" in got["layout"] and "global batch 8" in got["layout"], got["layout"]
    # the same dev predictions (accuracy counts rows) and the same dev loss
    assert got["metrics"] == expected["metrics"]
    assert got["dev_loss"].keys() == expected["dev_loss"].keys()
    for split, loss in expected["dev_loss"].items():
        assert got["dev_loss"][split] == pytest.approx(loss, rel=TOLERANCE), split
    assert got["predictions"] == expected["predictions"] and expected["predictions"]
    for file in expected["predictions"].values():
        assert (out / file).read_text() == (reference / file).read_text(), file
    output = (out / "output.txt").read_text()
    assert output.count("[megahf] done in") == 1 and output.count("smoke run") == 1, output[-3000:]
    got_losses, expected_losses = losses(out), losses(reference)
    assert sorted(got_losses) == list(range(1, expected["steps"] + 1)) and got_losses.keys() == expected_losses.keys()
    for step, loss in expected_losses.items():
        assert got_losses[step] == pytest.approx(loss, rel=TOLERANCE), f"step {step}"


def assert_close_weights(got: dict, expected: dict, scale: float, what: str) -> None:
    assert got.keys() == expected.keys()
    errors = {n: (got[n] - ref).abs().max().item() / scale for n, ref in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{what}: {worst} off by {errors[worst]:.2e}"


@pytest.mark.parametrize("layout", ["ddp2", "fsdp2", "tp2"])
def test_finetune_layout_equals_one_process(layout, layout_run):
    out, reference = layout_run(layout), layout_run("single")
    assert_same_dev_figures(out, reference, 2)
    got_weights, ref_weights = final_weights(out), final_weights(reference)
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
    assert_close_weights(got_weights, ref_weights, scale, layout)


def merged_updates(out: Path) -> dict[str, torch.Tensor]:
    """What the saved adapter adds to the model: s x B @ A per adapted layer (merged, W + s x B @ A, with the same
    frozen W in every layout), and the task head trained in full."""
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    merged = {name: tensor for name, tensor in adapter.items() if ".lora_" not in name}
    for name in [n for n in adapter if n.endswith(".lora_A.weight")]:
        b = adapter[name.replace("lora_A", "lora_B")]
        merged[name.removesuffix(".lora_A.weight")] = scaling * b @ adapter[name]
    return merged


def assert_same_adapter(out: Path, reference: Path, base: Path, what: str) -> None:
    """The merged weights agree to TOLERANCE of the largest weight of the model. The factors A and B themselves are
    not compared: in the first step after B leaves zero a few of A's gradient elements are ~1e-9, where Adam's eps
    makes the step depend on the gradient's size, so summation-order roundoff moves such an element by up to ~lr
    (1e-4 of A seen here) while its product with B (~1e-2), what the model computes with, stays within 1e-6."""
    scale = max(w.abs().max().item() for w in load_file(base / "model.safetensors").values())
    got, expected = merged_updates(out), merged_updates(reference)
    # The multiple-choice head's bias shifts the scores of all choices alike, which softmax ignores: its gradient is
    # exactly zero, and AdamW turns the roundoff there into steps of up to lr (as for the key bias above).
    for name in [n for n in expected if n.endswith("multichoice_head.bias")]:
        assert (got.pop(name) - expected.pop(name)).abs().max() <= STEPS * LR, name
    assert_close_weights(got, expected, scale, what)


@pytest.mark.parametrize("layout", [
    "lora-tp2",
    pytest.param("lora-ddp2", marks=pytest.mark.extended),
    pytest.param("lora-fsdp2", marks=pytest.mark.extended),
    pytest.param("lora-tp2xfsdp2", marks=pytest.mark.extended),
    pytest.param("race-lora-tp2xfsdp2", marks=pytest.mark.extended),
])
def test_lora_layout_equals_one_process(layout, layout_run, base):
    """LoRA with its adapters sharded as their base layers (TP: B split with a column-parallel layer's output, A with a
    row-parallel layer's input; FSDP2: with their layer's unit), the task head trained in full."""
    out, reference = layout_run(layout), layout_run(layout.rsplit("-", 1)[0] + "-single")
    assert_same_dev_figures(out, reference, RUNS[layout][0])
    assert_same_adapter(out, reference, base, layout)


@pytest.mark.extended
def test_qlora_under_fsdp2_learns_and_equals_one_process(layout_run, base):
    """QLoRA's 4-bit base sharded by FSDP2 (its packed storage split over the ranks): the run of one process, and both
    learn the fixture to above chance + 4 binomial standard deviations."""
    out, reference = layout_run("qlora-fsdp2"), layout_run("qlora-single")
    assert_same_dev_figures(out, reference, 2)
    assert_same_adapter(out, reference, base, "qlora-fsdp2")
    results = json.loads((out / "results.json").read_text())
    assert results["peft"] == "qlora" and results["metrics"]["accuracy"] >= above_chance(0.5, 32), results
    assert "FSDP2 2" in results["layout"]


@pytest.mark.extended
def test_a_lora_run_killed_under_tensor_parallelism_resumes_exactly(layout_run, base, tmp_path):
    """SIGKILL after step 6 of the TP=2 LoRA run, then the same command: it resumes from step 4 and ends bitwise where
    the uninterrupted TP=2 run ended (losses, dev figures, predictions, adapter)."""
    reference = layout_run("lora-tp2")
    out = tmp_path / "out"
    args = [str(RECIPE), *run_args(base, out, RUNS["lora-tp2"][1])]
    killed = launch(command(2, str(KILLED), "--kill_at_step", "6", *args), "killed TP=2 LoRA run",
                    expect_success=False)
    assert killed.returncode != 0 and not (out / "final").exists(), killed.stdout[-3000:]
    again = launch(command(2, "-m", "megahf", "finetune", *args), "resumed TP=2 LoRA run")
    assert f"resuming from {out / 'checkpoints' / 'step_0000004'}" in again.stdout
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text())
    assert (out / "predictions" / "SST-2.tsv").read_bytes() == (reference / "predictions" / "SST-2.tsv").read_bytes()
    assert losses(out) == losses(reference)
    got, expected = (load_file(o / "final" / "adapter_model.safetensors") for o in (out, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
