"""A loss that is not finite on one rank only stops every rank together, at that step, before its optimizer update,
with the documented error, and nothing of that step or later is written (tests/test_nonfinite.py: one process).

Two processes under torchrun (gloo, DDP: each rank its own micro-batches): rank 1's embedding gets a NaN just before
step 3, so only rank 1's loss is NaN; rank 0's own loss is finite and it must stop all the same (the check all-reduces
a flag over the ranks). The run saves every 2 steps: the complete checkpoint of step 2 stays, no later one, no
`final/`.
"""

from __future__ import annotations

import re
from pathlib import Path

from _launch import RECIPE, launch, tiny_args, torchrun_command, write_corpus

WORKER = Path(__file__).with_name("_pretrain_nonfinite.py")
POISONED_RANK, POISONED_STEP = 1, 3


def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    args = tiny_args(corpus, out, train_steps=6, save_interval=2, global_batch_size=8)
    cmd = torchrun_command(2, str(WORKER), "--poison_rank", str(POISONED_RANK), "--poison_step", str(POISONED_STEP),
                           str(RECIPE), *args)
    done = launch(cmd, "pretrain with a NaN on rank 1", expect_success=False)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "finished without an error" not in done.stdout
    stops = dict(re.findall(r"^rank (\d): megahf pretrain: error: (.*)$", done.stdout, flags=re.MULTILINE))
    assert sorted(stops) == ["0", "1"], done.stdout[-3000:]  # every rank stopped, with the command line's error
    for rank, message in stops.items():
        assert message.startswith(f"step {POISONED_STEP}: the training loss is "), message
        assert "(not finite on at least one rank); the run stopped before this step's optimizer update" in message
    # rank 1 saw the NaN itself; rank 0's own loss was finite: it stopped because the check is shared
    assert stops["1"].startswith(f"step {POISONED_STEP}: the training loss is nan ")
    loss0 = float(re.match(r"step \d+: the training loss is (\S+) ", stops["0"]).group(1))
    assert 0 < loss0 < 20, stops["0"]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002"], checkpoints
    assert (out / "checkpoints" / "step_0000002" / "megahf_checkpoint.json").is_file()
    assert not (out / "final").exists()

