"""Exact resume on one process: a run killed with SIGKILL and started again with the same command continues from its
last checkpoint and ends bitwise where the uninterrupted run ends; damaged checkpoints are detected and skipped.
(Tensor parallel resume: tests/distributed/test_training_layouts.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from megahf.training import RecipeError, load_recipe, run_pretrain
from megahf.training import checkpoint as ckpt
from megahf.training.setup import build_layout

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from _launch import RECIPE, final_weights, losses, run_pretrain_cli, tiny_args, write_corpus  # noqa: E402

STEPS, SAVE = 6, 3


def recipe_args(corpus: Path, out: Path, **extra) -> list[str]:
    # Dropout stays on (the preset's 0.1): the resumed run must restore each random stream, not just the weights.
    return tiny_args(corpus, out, train_steps=STEPS, save_interval=SAVE, **extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus.jsonl")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """The uninterrupted run: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert result.metrics["resumed_from"] is None
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    assert losses(out) == losses(reference)  # every step's loss, bitwise
    got, expected = final_weights(out), final_weights(reference)
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"not bitwise equal: {different}"


def test_sigkill_then_same_command_resumes_exactly(corpus, straight, tmp_path):
    out = tmp_path / "out"
    killed = run_pretrain_cli(1, recipe_args(corpus, out), kill_at_step=SAVE + 1)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert not (out / "final").exists()
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_0000003"]

    result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))  # the same command again
    assert result.metrics["resumed_from"] == str(out / "checkpoints" / "step_0000003")
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert_same_run(out, straight)
    assert len(set(losses(out).values())) == STEPS  # dropout on: a replayed random stream would still match


def test_async_save_equals_the_blocking_save_and_a_sigkill_mid_write_resumes_from_the_previous(corpus, straight,
                                                                                                 tmp_path):
    """async_save: the checkpoints hold what a blocking save holds (the run and its resume end bitwise where the
    uninterrupted run ends), and a SIGKILL while the last one is written leaves the previous one as the newest
    complete: its folder never got its marker."""
    out = tmp_path / "out"
    args = recipe_args(corpus, out, async_save="true")
    killed = run_pretrain_cli(1, args, kill_at_save=STEPS)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert "checkpoint of step 6: writing in the background" in killed.stdout
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_0000003"]
    assert not (out / "checkpoints" / "step_0000006").exists()  # at most the unpublished .step_0000006.partial
    result = run_pretrain(load_recipe(RECIPE, args))  # the same command again
    assert result.metrics["resumed_from"] == str(out / "checkpoints" / "step_0000003")
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_0000006", "step_0000003"]
    assert_same_run(out, straight)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(corpus, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    shard = next((out / "checkpoints" / "step_0000006" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash or a full disk
    with pytest.warns(UserWarning, match=r"step_0000006 is incomplete or damaged \(model_optim/.*distcp has 100 bytes"):
        result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert result.metrics["resumed_from"].endswith("step_0000003")
    assert_same_run(out, straight)


def test_the_same_command_after_the_end_trains_no_further(corpus, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert result.trainer.state.global_step == STEPS and result.metrics["steps"] == STEPS
    assert_same_run(out, straight)


def test_resume_refuses_another_global_batch(corpus, straight):
    recipe = load_recipe(RECIPE, recipe_args(corpus, straight, micro_batch_size=2))
    with pytest.raises(RecipeError, match=r"written with global_batch_size=4, the recipe and launch now give 2: the "
                                          r"data position \(consumed samples = step x global batch\) would not "
                                          r"match; set global_batch_size to 4, or resume: none"):
        run_pretrain(recipe)


def test_resume_accepts_another_layout(corpus, straight, capsys):
    """Another layout at the same global batch resumes (resharded; tests/distributed/test_training_layouts.py runs
    it); the change is said."""
    from megahf.training.resume import find_resume_checkpoint

    recipe = load_recipe(RECIPE, recipe_args(corpus, straight, micro_batch_size=2,
                                             tensor_parallel_size=2))  # 4 ranks: TP 2 x DP 2 x micro 2 = batch 4
    assert find_resume_checkpoint(recipe, build_layout(recipe, 4)) == straight / "checkpoints" / "step_0000006"
    assert ("written at 1 process(es), tensor_parallel_size=1, fsdp_size=1 on 4 process(es), tensor_parallel_size=2"
            in capsys.readouterr().out)


@pytest.mark.parametrize("key, value, reason", [
    ("seq_length", 16, r"the data position \(samples of seq_length \+ 1 tokens\) would not match; set seq_length to 32"),
    ("seed", 7, r"the data order and split follow the seed, so the data position would not match; set seed to 1234"),
])
def test_resume_refuses_what_moves_the_data_position(corpus, straight, key, value, reason):
    from megahf.training.resume import find_resume_checkpoint

    recipe = load_recipe(RECIPE, recipe_args(corpus, straight, **{key: value}))
    with pytest.raises(RecipeError, match=rf"written with {key}=\d+, the recipe and launch now give {value}: {reason}"):
        find_resume_checkpoint(recipe, build_layout(recipe, 1))


def test_the_scheduler_state_fits_another_number_of_parameter_groups():
    state = {"base_lrs": [1e-3] * 4, "_last_lr": [5e-4] * 4, "lr_lambdas": [{}] * 4, "last_epoch": 3}
    assert ckpt.fit_scheduler_state(state, 2) == {**state, "base_lrs": [1e-3] * 2, "_last_lr": [5e-4] * 2,
                                                   "lr_lambdas": [{}] * 2}
    with pytest.raises(ckpt.CheckpointError, match=r"per-group values that differ \(base_lrs\)"):
        ckpt.fit_scheduler_state({**state, "base_lrs": [1e-3, 1e-3, 2e-3, 1e-3]}, 2)


def test_resume_path_must_be_a_complete_checkpoint(corpus, straight, tmp_path):
    damaged = tmp_path / "step_0000003"
    shutil.copytree(straight / "checkpoints" / "step_0000003", damaged)
    (damaged / ckpt.MARKER).unlink()
    with pytest.raises(RecipeError, match=r"resume=.*unusable \(no megahf_checkpoint.json"):
        run_pretrain(load_recipe(RECIPE, recipe_args(corpus, tmp_path / "out", resume=damaged)))
    with pytest.raises(RecipeError, match=r"resume='nowhere' is invalid: use 'auto', 'none' or an existing"):
        load_recipe(RECIPE, ["--resume", "nowhere"])


# ---------------------------------------------------------------------- the checkpoint module on its own


def _save(root: Path, step: int, keep_last: int = 2) -> Path:
    from transformers import TrainerState

    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, model, optimizer, scheduler, TrainerState(global_step=step),
                                {"global_batch_size": 4}, keep_last=keep_last)


def test_keeps_the_last_k_and_leaves_no_partial_folder(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]
    meta = ckpt.read_metadata(tmp_path / "step_0000003")
    assert meta["step"] == 3 and meta["global_batch_size"] == 4
    assert set(meta["files"]) >= {"scheduler.pt", "trainer_state.json", "rng/rank_00000.json", "model_optim/.metadata"}


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / ckpt.MARKER).unlink(), "no megahf_checkpoint.json"),
    (lambda p: (p / ckpt.MARKER).write_text("{"), "unreadable megahf_checkpoint.json"),
    (lambda p: (p / "rng" / "rank_00000.json").unlink(), "rng/rank_00000.json is missing"),
    (lambda p: (p / "scheduler.pt").write_bytes(b"x"), "scheduler.pt has 1 bytes"),
])
def test_damage_is_detected_and_the_previous_checkpoint_used(tmp_path, damage, problem):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (tmp_path / ".step_0000003.partial").mkdir()  # a write that never finished: not even a candidate
    assert ckpt.latest_checkpoint(tmp_path) == newest
    damage(newest)
    assert problem in ckpt.checkpoint_problem(newest)
    with pytest.warns(UserWarning, match="step_0000002 is incomplete or damaged"):
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000001"


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
