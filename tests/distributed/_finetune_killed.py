"""`megahf finetune` that kills itself with SIGKILL right after optimizer step --kill_at_step (on rank 0; torchrun then
takes the other ranks down), as `_pretrain_killed.py` does for pretraining.

    python tests/distributed/_finetune_killed.py --kill_at_step 6 RECIPE [--key value ...]
"""

from __future__ import annotations

import sys

from _pretrain_killed import KillAtStep

from megahf.training.finetune import load_finetune_recipe, run_finetune

if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "--kill_at_step":
        raise SystemExit(__doc__)
    run_finetune(load_finetune_recipe(sys.argv[3], sys.argv[4:]), callbacks=[KillAtStep(int(sys.argv[2]))])
