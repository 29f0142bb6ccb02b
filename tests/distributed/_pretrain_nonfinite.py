"""`megahf pretrain` in which one rank's loss turns NaN: `--poison_rank R --poison_step S` turns one weight of rank R
into NaN just before step S (the other ranks keep finite weights, hence a finite loss of their own); every rank
reports the error as the command line does, with its rank in front, and exits 2.

    torchrun --nproc_per_node 2 tests/distributed/_pretrain_nonfinite.py --poison_rank 1 --poison_step 3 RECIPE ...
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import TrainerCallback

from megahf.errors import MegahfError, one_line
from megahf.training import load_recipe, run_pretrain


class PoisonWeightsAt(TrainerCallback):
    """On rank `rank` only, one weight of the embedding becomes NaN before step `step` runs. Under DDP the weights
    are not broadcast again, so only that rank's forward, and its loss, sees it."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            with torch.no_grad():
                model.get_input_embeddings().weight[0, 0] = float("nan")


if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[1] != "--poison_rank" or sys.argv[3] != "--poison_step":
        raise SystemExit(__doc__)
    rank = int(os.environ.get("RANK", "0"))
    try:
        run_pretrain(load_recipe(sys.argv[5], sys.argv[6:]),
                     callbacks=[PoisonWeightsAt(int(sys.argv[2]), int(sys.argv[4]))])
    except MegahfError as error:
        print(f"rank {rank}: megahf pretrain: error: {one_line(error)}", flush=True)
        sys.exit(2)
    print(f"rank {rank}: finished without an error", flush=True)
