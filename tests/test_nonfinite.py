"""A loss that is not finite stops the run at that step, before its optimizer update, and nothing non-finite is ever
written (Megatron's check for NaN in the loss): no checkpoint of that step or later, no `final/`."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from megahf.training import load_recipe, run_pretrain
from megahf.training.trainer import NonFiniteError, check_finite_loss, check_finite_weights

from test_pretrain import tiny_overrides, write_corpus

POISONED_STEP = 3


class PoisonWeightsAt(TrainerCallback):
    """Turn one weight into NaN just before step `step` runs (what a diverging run looks like one step later)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.get_input_embeddings().weight[0, 0] = float("nan")


def test_nan_loss_stops_the_run_and_writes_nothing_for_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    recipe = load_recipe(None, tiny_overrides(corpus, out, train_steps=6, save_interval=2, eval_interval=0))
    with pytest.raises(NonFiniteError, match=rf"step {POISONED_STEP}: the training loss is nan .*learning_rate"):
        run_pretrain(recipe, callbacks=[PoisonWeightsAt(POISONED_STEP)])
    # The checkpoint of step 2 (before the NaN) is there and complete; nothing of step 3 or later, no final model.
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002"], checkpoints
    assert (out / "checkpoints" / "step_0000002" / "megahf_checkpoint.json").is_file()
    assert not (out / "final").exists()


def test_check_finite_loss_accepts_finite_and_names_the_step():
    check_finite_loss(torch.tensor(2.5), step=7)
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NonFiniteError, match="step 7: the training loss is"):
            check_finite_loss(torch.tensor(value), step=7)


def test_non_finite_weights_are_never_written():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    check_finite_weights(model, "final model")
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"not writing the final model: .*1\.bias"):
        check_finite_weights(model, "final model")


def test_the_command_line_reports_it_in_one_line():
    from megahf.errors import MegahfError

    assert issubclass(NonFiniteError, MegahfError)  # `megahf pretrain: error: step N: ...`, exit status 2
