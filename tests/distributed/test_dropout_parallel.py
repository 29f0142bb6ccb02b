"""Dropout under tensor and sequence parallelism, as Megatron's model-parallel RNG tracker draws it (the worker,
`_dropout_worker.py`, says what is measured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_torchrun

WORKER = Path(__file__).with_name("_dropout_worker.py")
DROPOUT = 0.3  # the worker's rate


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout") / "report.json"
    return run_torchrun(2, [], out, worker=WORKER)


def test_replicated_activations_identical_and_head_masks_differ(report):
    tp = report["tp2"]
    assert tp["layer_outputs_identical"], "the replicated residual stream drifted apart between the TP ranks"
    assert abs(tp["attention_drop_fraction"] - DROPOUT) < 0.05  # dropout is on (hundreds of probabilities per rank)
    assert tp["attention_masks_differ"], "both ranks dropped the same attention probabilities of their own heads"


def test_sequence_shard_masks_differ(report):
    sp = report["tp2-sp"]
    assert sp["hidden_shard_rows"] == 8  # the hidden dropout saw half of the 16 positions
    assert abs(sp["hidden_drop_fraction"] - DROPOUT) < 0.05
    assert sp["hidden_masks_differ"], "both ranks dropped the same elements of their own sequence shards"


def test_recomputation_replays_the_dropout_masks(report):
    sp = report["tp2-sp"]
    # The recomputed forward repeats the same operations on the same values: equal up to nothing.
    assert sp["recompute_selective_grads"] == 0.0 and sp["recompute_full_grads"] == 0.0, sp
    # Without the tracker put back for the recomputation the masks change and the gradients are off by their size.
    assert sp["recompute_full_without_rng_context_grads"] > 1e-2


def test_sequence_not_divisible_by_tp_is_refused(report):
    assert report["odd_sequence_error"] is not None, "a 15-token sequence ran under sequence parallelism at TP=2"
    assert "sequence length 15 is not divisible by tensor_parallel_size=2" in report["odd_sequence_error"]
    assert "multiple of 2" in report["odd_sequence_error"]
