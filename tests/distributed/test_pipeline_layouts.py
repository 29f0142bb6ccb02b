"""`megahf pretrain` with pipeline parallelism equals one process at the same global batch: every schedule, PP x TP
(with and without sequence parallelism), PP x FSDP2, PP x replicas, tied and untied GPT-2-style and Llama-style
GPTs; a PP run killed with SIGKILL resumes bitwise; checkpoints move between pipelined and other layouts.

Each run is launched as a user launches it (torchrun on gloo, the layout in recipe keys) and trains a 4-layer,
hidden-64 GPT for 6 steps at a global batch of 8 (one process: micro-batch 4 x accumulation 2; PP=2: the two
micro-batches through two stages). Dropout is off: a stage draws its masks from its own rank's stream, so with
dropout the runs differ by design. Compared: the loss of every step, the validation loss (where the data-parallel
size is 1: more data-parallel ranks split the validation batches otherwise, as DDP does), and every weight of the
final model (which a pipelined run assembles on rank 0).

Tolerance, as in test_training_layouts.py: losses relative 1e-5; weights max |difference| relative to the model's
largest weight (AdamW moves every element by about lr whatever its gradient, so the roundoff of a near-zero gradient
element becomes a weight difference of order lr x roundoff / eps, independent of that tensor's own scale). The
pipeline sums the micro-batch gradients in the order one process accumulates them, but the stages' gradient norms
are combined from per-stage norms, and the tied embedding's two gradients are summed in the other order: roundoff
only. A wrong split (a layer run twice, a tied copy not summed, the clipping of one stage only) is off by 1e-3 and
more from step 2 on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _launch import final_weights, losses, relative_weight_errors, run_pretrain_cli, tiny_args, write_corpus

STEPS, SAVE = 6, 3
TOLERANCE = 1e-5
PP2 = {"pipeline_parallel_size": 2}
LAYOUTS = {  # name -> (processes, recipe keys, reference run)
    "pp2": (2, PP2, "single"),
    "pp2-gpipe": (2, {**PP2, "pipeline_schedule": "gpipe"}, "single"),
    "pp2-interleaved": (2, {**PP2, "pipeline_schedule": "interleaved-1f1b", "virtual_pipeline_size": 2}, "single"),
    "pp2-zero-bubble": (2, {**PP2, "pipeline_schedule": "interleaved-zb", "virtual_pipeline_size": 2}, "single"),
    "pp2xtp2": (4, {**PP2, "tensor_parallel_size": 2}, "single"),
    # sequence parallelism inside the stages: they exchange sequence shards in training, whole sequences in eval
    "pp2xtp2-sp": (4, {**PP2, "tensor_parallel_size": 2, "sequence_parallel": True}, "single"),
    # 2 data-parallel ranks of micro-batch 2: the same global batch of 8, the same micro-batches of the step
    "pp2xfsdp2": (4, {**PP2, "fsdp_size": 2, "micro_batch_size": 2}, "single"),
    "pp2xddp2": (4, {**PP2, "micro_batch_size": 2}, "single"),
    "pp2-untied": (2, {**PP2, "model_overrides.tie_word_embeddings": False}, "untied"),
    "pp2-llama": (2, {**PP2, "model": "llama-tiny"}, "llama"),
    # every layer recomputed in its backward (non-reentrant checkpointing inside the stages)
    "pp2-recompute": (2, {**PP2, "recompute": "full"}, "single"),
}
# the runs the pipelined ones are compared with: name -> (processes, recipe keys)
REFERENCES = {"single": (1, {}), "untied": (1, {"model_overrides.tie_word_embeddings": False}),
              "llama": (1, {"model": "llama-tiny"}), "tp2": (2, {"tensor_parallel_size": 2})}
# The default tier runs the plain schedule (and, below, its kill and resume); the others repeat the mechanism with
# more processes, another schedule or another model (extended tier, ~10 s each on two cores, ~20 s with 4 processes).
DEFAULT_TIER = {"pp2"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # about 140 training samples of 33 tokens: the 6 steps of 8 stay inside the first epoch; 35 validation samples
    # (a last validation batch of 3: the short batch is weighed as one process weighs it)
    return write_corpus(tmp_path_factory.mktemp("pipeline") / "corpus.jsonl", n_docs=120)


def run_args(corpus, out, keys: dict) -> list[str]:
    values = {"train_steps": STEPS, "global_batch_size": 8, "save_interval": SAVE, "model_overrides.num_layers": 4,
              "sample_tokens": 4,
              "model_overrides.hidden_dropout": 0.0, "model_overrides.attention_dropout": 0.0}
    return tiny_args(corpus, out, **{**values, **keys})


@pytest.fixture(scope="module")
def pipeline_run(corpus, tmp_path_factory):
    """Output folder of a layout's or a reference's run, run once per module."""
    done = {}

    def get(name: str):
        if name not in done:
            nproc, keys = LAYOUTS[name][:2] if name in LAYOUTS else REFERENCES[name]
            out = tmp_path_factory.mktemp(name) / "out"
            result = run_pretrain_cli(nproc, run_args(corpus, out, keys))
            (out / "output.txt").write_text(result.stdout)
            done[name] = out
        return done[name]

    return get


def assert_same_run(name: str, out, reference, steps=range(1, STEPS + 1)) -> None:
    got, expected = losses(out), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    errors = {step: abs(got[step] - expected[step]) / abs(expected[step]) for step in steps}
    assert max(errors.values()) <= TOLERANCE, (name, got, expected)
    assert expected[STEPS] < expected[1] - 0.3  # it did train
    weight_errors = relative_weight_errors(final_weights(out), final_weights(reference))
    worst = max(weight_errors, key=weight_errors.get)
    print(f"{name}: worst loss error {max(errors.values()):.1e}, weights {weight_errors[worst]:.1e} ({worst})")
    assert weight_errors[worst] <= TOLERANCE, f"{name}: {worst} off by {weight_errors[worst]:.2e}"


@pytest.mark.parametrize("layout", [
    pytest.param(name, marks=[] if name in DEFAULT_TIER else [pytest.mark.extended]) for name in LAYOUTS])
def test_pipeline_layout_equals_one_process(layout, pipeline_run):
    nproc, keys, reference_name = LAYOUTS[layout]
    out, reference = pipeline_run(layout), pipeline_run(reference_name)
    assert_same_run(layout, out, reference)
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{nproc} processes x pipeline parallel 2 ({keys.get('pipeline_schedule', '1f1b')}" in metrics["layout"]
    output = (out / "output.txt").read_text()
    # one set of log lines, from rank 0 (which holds the first stage, not the loss)
    assert output.count(f"step {STEPS:>5}/{STEPS} | loss") == 1 and output.count("[megahf] model:") == 1
    assert "sample: none under pipeline parallelism" in output and metrics["sample"] == ""
    if "fsdp" not in layout and "ddp" not in layout:
        expected = json.loads((reference / "metrics.json").read_text())["valid_loss"]
        assert metrics["valid_loss"] == pytest.approx(expected, rel=TOLERANCE)
    # final/ is one ordinary model folder, the same keys as one process writes
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()


@pytest.mark.extended
def test_the_schedules_equal_each_other(pipeline_run):
    """1F1B and GPipe accumulate the same micro-batch gradients in the same order: equal bit for bit; the
    interleaved schedules split the layers into other stages (other sends), within the tolerance."""
    plain = pipeline_run("pp2")
    assert losses(pipeline_run("pp2-gpipe")) == losses(plain)
    for other in ("pp2-interleaved", "pp2-zero-bubble"):
        assert_same_run(other, pipeline_run(other), plain)


def test_pipelined_run_killed_resumes_exactly(corpus, pipeline_run, tmp_path):
    """Killed after step 4 at PP=2, resumed from step 3 by the same command: every loss and weight bitwise those of
    the run that was never interrupted (same layout, same reductions)."""
    nproc, keys, _ = LAYOUTS["pp2"]
    out = tmp_path / "out"
    killed = run_pretrain_cli(nproc, run_args(corpus, out, keys), kill_at_step=SAVE + 1)
    assert killed.returncode != 0 and not (out / "final").exists()
    run_pretrain_cli(nproc, run_args(corpus, out, keys))  # the same command again
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(f"step_{SAVE:07d}")
    straight = pipeline_run("pp2")
    assert losses(out) == losses(straight)
    got, expected = final_weights(out), final_weights(straight)
    assert [n for n in expected if not torch.equal(got[n], expected[n])] == []


# source run -> (processes, recipe keys) it is resumed at; the straight source run is the reference
RESUMES = {
    ("pp2", "single"): (1, {}),
    ("single", "pp2"): LAYOUTS["pp2"][:2],
    ("tp2", "pp2"): LAYOUTS["pp2"][:2],
}
EXTENDED_RESUMES = {("pp2", "single"), ("single", "pp2"), ("tp2", "pp2")}


@pytest.mark.parametrize("source, target", [
    pytest.param(s, t, marks=[pytest.mark.extended] if (s, t) in EXTENDED_RESUMES else []) for s, t in RESUMES])
def test_a_checkpoint_resumes_across_pipeline_layouts(corpus, pipeline_run, tmp_path, source, target):
    """Steps 4-6 after resuming the source's step-3 checkpoint on the target layout give the straight source run's
    losses and final weights (the tied embedding's optimizer state is stored once, under the embedding's name,
    whatever the layout)."""
    straight = pipeline_run(source)
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints" / f"step_{SAVE:07d}", out / "checkpoints" / f"step_{SAVE:07d}")
    nproc, keys = RESUMES[source, target]
    result = run_pretrain_cli(nproc, run_args(corpus, out, keys))
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(f"step_{SAVE:07d}")
    assert "model and optimizer resharded" in result.stdout
    assert_same_run(f"{source} -> {target}", out, straight, steps=range(SAVE + 1, STEPS + 1))


@pytest.mark.extended
def test_a_pipelined_checkpoint_converts_to_a_model_folder(pipeline_run, tmp_path):
    """`megahf convert --from megahf` reads a PP=2 training checkpoint (each stage's shards) into one model folder:
    the last step's checkpoint holds what final/ holds, bit for bit."""
    out = pipeline_run("pp2")
    folder = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "megahf", "convert", "--from", "megahf", "--to", "megahf", "--no-progress",
                    str(out / "checkpoints" / f"step_{STEPS:07d}"), str(folder)], check=True)
    converted, final = load_file(folder / "model.safetensors"), final_weights(out)
    assert converted.keys() == final.keys()
    assert [n for n in final if not torch.equal(converted[n], final[n])] == []
