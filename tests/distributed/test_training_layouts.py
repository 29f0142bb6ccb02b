"""`megahf pretrain` under every parallel layout (DDP, FSDP2, HSDP, TP, TP x FSDP2, TP with sequence parallelism,
compiled layers) equals one process at the same global batch, step by step (DDP bitwise); a tensor-parallel run
killed with SIGKILL resumes exactly when the same command is run again; and a checkpoint written at one layout
resumes at another (TP=2 -> 1, FSDP=2, TP=2 x FSDP=2, TP=4; FSDP=2 -> 1; DDP=2 -> 1) and ends where the
uninterrupted run ends.

Each layout is launched as a user launches it (torchrun on gloo, the layout in recipe keys) and trains the same tiny
GPT (and, at TP=2 and DDP=2, the same tiny BERT) for several steps at a global batch of 8 (one process: micro-batch
4 x accumulation 2). Dropout is off: the layouts draw their masks differently (per-rank streams under TP), so with
dropout the runs would differ by design; the resume test runs with it on. Compared: the loss of every step, the
gradient norm (clipped across meshes), and every weight of the final gathered model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _launch import final_weights, losses, relative_weight_errors, run_pretrain_cli, tiny_args, write_corpus

STEPS, SAVE = 6, 3
LAYOUTS = {  # name -> (processes, recipe keys)
    "ddp2": (2, {}),
    # the same run started for real by `accelerate launch --config_file recipes/accelerate/cpu-multi.yaml` (extended:
    # the default tier's real two-process accelerate launch is test_plan's written launch config)
    "ddp2-accelerate": (2, {}),
    "fsdp2": (2, {"fsdp_size": 2}),
    # FSDP2 from the launch config: `accelerate launch --config_file recipes/accelerate/cpu-fsdp2.yaml`
    # (distributed_type: FSDP, as `accelerate config` writes it) and the recipe's fsdp_size 0
    "fsdp2-accelerate": (2, {}),
    "tp2": (2, {"tensor_parallel_size": 2}),
    "tp2xfsdp2": (4, {"tensor_parallel_size": 2, "fsdp_size": 2}),
    # Megatron's sequence parallelism, with the attention core recomputed (selective) and the recipe's default chunked
    # loss (loss_chunk_size 1024: the sequence gathered after the final norm): the same numbers
    "tp2-sp": (2, {"tensor_parallel_size": 2, "sequence_parallel": True, "recompute": "selective"}),
    # compile: true (each layer torch.compile'd, FSDP2's hooks around it eager); the first compile takes ~30 s
    "fsdp2-compile": (2, {"fsdp_size": 2, "compile": True}),
    # compiled layers whose norms, dropouts and linears run the sequence-parallel styles (~50 s on two cores)
    "tp2-sp-compile": (2, {"tensor_parallel_size": 2, "sequence_parallel": True, "compile": True}),
    # compile under DDP (launched by torchrun), plain TP and TP x FSDP2: what the layouts above and fsdp2-compile prove
    # apart, combined (extended tier, each pays the first compile again)
    "ddp2-compile": (2, {"compile": True}),
    "tp2-compile": (2, {"tensor_parallel_size": 2, "compile": True}),
    "tp2xfsdp2-compile": (4, {"tensor_parallel_size": 2, "fsdp_size": 2, "compile": True}),
    # HSDP: FSDP2 over 2 ranks, 2 replicas of it (transformers' DistributedConfig with dp_replicate_size 2); 4
    # data-parallel ranks of micro-batch 2 take the same global batch of 8
    "hsdp": (4, {"fsdp_size": 2, "micro_batch_size": 2}),
}
# What each layout's log must say it ran (the layout line in metrics.json).
LAYOUT_LINES = {"hsdp": "4 processes x FSDP2 2 x HSDP replicas 2", "fsdp2-accelerate": "2 processes x FSDP2 2;"}
# Runs whose reductions are those of one process: DDP=2 averages two micro-batch gradients, (g1 + g2) / 2, where one
# process accumulates g1 / 2 + g2 / 2, the same floating-point values (halving is exact, and a sum of two is
# commutative), so the runs are equal bit for bit, not only within TOLERANCE.
BITWISE = {"ddp2", "ddp2-accelerate", "bert-ddp2"}
# The default tier keeps one run per mechanism; these repeat what it proves with more processes or compile time.
EXTENDED_LAYOUTS = {"ddp2-accelerate", "fsdp2-accelerate", "tp2-sp-compile", "ddp2-compile", "tp2-compile",
                    "tp2xfsdp2-compile", "hsdp"}
DROPOUT = {"model_overrides.hidden_dropout": 0.1, "model_overrides.attention_dropout": 0.1}
# BERT: masked LM + sentence order on sentence-split data built from the same corpus.
BERT = {"model": "bert-tiny", "tokenizer": "bert-uncased-embedded", "split": "80,20,0", "eval_iters": 1,
        "sample_prompt": "The king [MASK] the queen."}
BERT_LAYOUTS = {"bert-single": (1, BERT), "bert-tp2": (2, {**BERT, "tensor_parallel_size": 2}),
                "bert-ddp2": (2, BERT)}
# Losses: relative. Weights: max |difference| relative to the largest weight of the model, not of each tensor: AdamW
# moves every element by about lr whatever its gradient's size, so the roundoff of a near-zero gradient element (a
# zero-initialised bias) becomes a weight difference of the order of lr x roundoff / eps, independent of that
# tensor's own scale (see tests/distributed/test_parity.py). A wrong layout is off by 1e-2 and more.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 120 documents: about 140 training samples of 33 tokens, so the 6 steps of 8 stay inside the first epoch (how a
    # last partial batch is split over data-parallel ranks is not what these tests compare)
    return write_corpus(tmp_path_factory.mktemp("layouts") / "corpus.jsonl", n_docs=120)


def layout_args(corpus, out, keys: dict) -> list[str]:
    values = {"train_steps": STEPS, "global_batch_size": 8, "save_interval": SAVE, "sample_tokens": 4,
              "sample_prompt": "The king",  # generate() / fill-mask on the sharded model, every rank together
              "model_overrides.hidden_dropout": 0.0, "model_overrides.attention_dropout": 0.0}
    return tiny_args(corpus, out, **{**values, **keys})


@pytest.fixture(scope="module")
def layout_run(corpus, tmp_path_factory):
    """Output folder of a layout's run ('single': one process), run once per session."""
    done = {}

    def get(name: str):
        if name not in done:
            nproc, keys = {**LAYOUTS, **BERT_LAYOUTS}.get(name, (1, {}))
            out = tmp_path_factory.mktemp(name) / "out"
            # The CPU launch configs are tested here, where their runs are also checked for exactness (each once:
            # BERT's runs use the tests' launcher).
            launch_config = {"single": "cpu.yaml", "ddp2-accelerate": "cpu-multi.yaml",
                             "fsdp2-accelerate": "cpu-fsdp2.yaml"}.get(name, "")
            result = run_pretrain_cli(nproc, layout_args(corpus, out, keys), launch_config=launch_config)
            (out / "output.txt").write_text(result.stdout)
            done[name] = out
        return done[name]

    return get


def assert_same_run(name: str, out, reference, nproc: int) -> None:
    """The run in `out` (`nproc` processes) equals the one-process run in `reference`, step by step."""
    got_losses, got_weights = losses(out), final_weights(out)
    ref_losses, ref_weights = losses(reference), final_weights(reference)
    metrics = json.loads((out / "metrics.json").read_text())
    output = (out / "output.txt").read_text()
    # One progress bar and one set of log lines, from the main process only.
    assert output.count(f" 0/{STEPS} [") == 1 and output.count("[megahf] model:") == 1, output[-3000:]
    assert output.count(f"step {STEPS:>5}/{STEPS} | loss") == 1
    assert metrics["sample"].startswith("The king") and len(metrics["sample"]) > len("The king")
    assert f"{nproc} processes" in metrics["layout"] and "global batch 8" in metrics["layout"], metrics["layout"]
    assert LAYOUT_LINES.get(name, "") in metrics["layout"], metrics["layout"]

    if LAYOUTS.get(name, (1, {}))[0] == LAYOUTS.get(name, (1, {}))[1].get("tensor_parallel_size", 0):
        # every rank holds the same batches (tensor parallelism alone): the validation loss is one process's, the
        # short last batch weighed by its real rows (the tensor-parallel ranks' copies counted once)
        reference_metrics = json.loads((reference / "metrics.json").read_text())
        assert metrics["valid_loss"] == pytest.approx(reference_metrics["valid_loss"], rel=TOLERANCE)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    loss_errors = {step: abs(got_losses[step] - ref_losses[step]) / abs(ref_losses[step]) for step in ref_losses}
    assert max(loss_errors.values()) <= TOLERANCE, (got_losses, ref_losses)
    assert ref_losses[STEPS] < ref_losses[1] - 0.3  # it did train
    if name in BITWISE:
        assert got_losses == ref_losses, (got_losses, ref_losses)
        assert got_weights.keys() == ref_weights.keys()
        assert [n for n, ref in ref_weights.items() if not torch.equal(got_weights[n], ref)] == []
        print(f"{name}: losses and final weights bitwise equal to one process")
        return

    weight_errors = relative_weight_errors(got_weights, ref_weights)
    worst = max(weight_errors, key=weight_errors.get)
    print(f"{name}: worst loss error {max(loss_errors.values()):.1e}, weights {weight_errors[worst]:.1e} ({worst})")
    assert weight_errors[worst] <= TOLERANCE, f"{name}: {worst} off by {weight_errors[worst]:.2e}"


# compile under TP with sequence parallelism repeats what fsdp2-compile and tp2-sp prove apart, HSDP (4 processes, ~60 s
# on two cores) what fsdp2 and ddp2 prove apart: extended tier
@pytest.mark.parametrize("layout", [
    pytest.param(name, marks=[pytest.mark.extended] if name in EXTENDED_LAYOUTS else []) for name in LAYOUTS])
def test_layout_equals_one_process(layout, layout_run):
    assert_same_run(layout, layout_run(layout), layout_run("single"), LAYOUTS[layout][0])


def test_bert_tensor_parallel_equals_one_process(layout_run):
    out = layout_run("bert-tp2")
    assert_same_run("bert-tp2", out, layout_run("bert-single"), 2)
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((layout_run("bert-single") / "metrics.json").read_text())
    assert "[MASK] at" in metrics["sample"]  # the fill-mask sample, computed on the sharded model
    for key in ("valid_mlm_loss", "valid_sop_loss", "valid_sop_accuracy"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-5), key


def test_bert_data_parallel_equals_one_process(layout_run):
    """Both runs train with the recipes' loss_chunk_size, so BERT's masked-LM head runs on the labeled positions
    only; under DDP the wrapped model's head reads the output layer's parameters itself, and DDP's gradient hooks
    still see every gradient. Bitwise equal (BITWISE): every step's loss and every final weight."""
    assert_same_run("bert-ddp2", layout_run("bert-ddp2"), layout_run("bert-single"), 2)


def test_tensor_parallel_run_killed_resumes_exactly(corpus, layout_run, tmp_path):
    """Killed after step 4, resumed from step 3 by the same command: the same losses and weights as a run that was
    never interrupted, with dropout on at TP=2 with sequence parallelism (the replicated activations draw from the
    default stream, the attention heads and the sequence shards from each rank's own): the resumed run must continue
    every RNG stream where the checkpoint left it."""
    nproc, keys = LAYOUTS["tp2-sp"]
    keys = {**keys, **DROPOUT}
    out = tmp_path / "out"
    killed = run_pretrain_cli(nproc, layout_args(corpus, out, keys), kill_at_step=SAVE + 1)
    assert killed.returncode != 0 and not (out / "final").exists()
    run_pretrain_cli(nproc, layout_args(corpus, out, keys))  # the same command again
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(f"step_{SAVE:07d}")
    straight = tmp_path / "straight"
    run_pretrain_cli(nproc, layout_args(corpus, straight, keys))
    # dropout is on indeed: the run differs from the same layout without it
    assert losses(straight)[STEPS] != losses(layout_run("tp2-sp"))[STEPS]
    assert losses(out) == losses(straight)  # bitwise: same layout, same reductions, same masks
    got, expected = final_weights(out), final_weights(straight)
    assert [n for n in expected if not torch.equal(got[n], expected[n])] == []


# ---------------------------------------------------------------------- resume on another layout

# source layout -> layouts its step-3 checkpoint is resumed at (the straight source run is the reference)
ELASTIC = {
    # the TP x FSDP resume also writes its checkpoints in the background (async_save on 4 processes)
    "tp2": {"single": (1, {}), "fsdp2": LAYOUTS["fsdp2"],
            "tp2xfsdp2": (4, {**LAYOUTS["tp2xfsdp2"][1], "async_save": "true"}),
            "tp4": (4, {"tensor_parallel_size": 4})},
    "fsdp2": {"single": (1, {})},
    "ddp2": {"single": (1, {})},
}


# The default tier resumes TP=2 at one process, FSDP=2 and TP=2 x FSDP=2 (async); the rest is the extended tier.
ELASTIC_EXTENDED = {("tp2", "tp4"), ("fsdp2", "single"), ("ddp2", "single")}


@pytest.mark.parametrize("source, target", [
    pytest.param(s, t, marks=[pytest.mark.extended] if (s, t) in ELASTIC_EXTENDED else [])
    for s, targets in ELASTIC.items() for t in targets])
def test_a_checkpoint_resumes_on_another_layout(corpus, layout_run, tmp_path, source, target):
    """Steps 4-6 after resuming the source run's step-3 checkpoint on the target layout give the straight source
    run's losses and final weights (dropout off; same tolerances as the layout parity above: only the order of the
    reductions differs)."""
    straight = layout_run(source)
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints" / f"step_{SAVE:07d}", out / "checkpoints" / f"step_{SAVE:07d}")
    nproc, keys = ELASTIC[source][target]
    result = run_pretrain_cli(nproc, layout_args(corpus, out, keys))
    (out / "output.txt").write_text(result.stdout)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(f"step_{SAVE:07d}")
    assert "model and optimizer resharded" in result.stdout and "re-seeded from seed" in result.stdout
    got, expected = losses(out), losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    errors = {step: abs(got[step] - expected[step]) / abs(expected[step]) for step in range(SAVE + 1, STEPS + 1)}
    assert max(errors.values()) <= TOLERANCE, f"{source} -> {target}: relative loss errors {errors}"
    weight_errors = relative_weight_errors(final_weights(out), final_weights(straight))
    worst = max(weight_errors, key=weight_errors.get)
    print(f"{source} -> {target}: losses 4-6 off by {max(errors.values()):.1e}, weights {weight_errors[worst]:.1e}")
    assert weight_errors[worst] <= TOLERANCE, f"{worst} off by {weight_errors[worst]:.2e}"
