"""`megahf pretrain` that kills itself with SIGKILL right after optimizer step --kill_at_step (on rank 0; torchrun
then takes the other ranks down): a crash mid-training, at a step the test knows, for the resume tests. With
--kill_at_save it dies right after the checkpoint of that step was started (with async_save: while it is written).

    python tests/distributed/_pretrain_killed.py --kill_at_step 4 RECIPE [--key value ...]
    python tests/distributed/_pretrain_killed.py --kill_at_save 6 RECIPE [--key value ...]
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

from megahf.training import load_recipe, run_pretrain


class KillAtStep(TrainerCallback):
    def __init__(self, step: int, event: str = "on_step_end"):
        self.step = step
        setattr(self, event, self._kill)

    def _kill(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    events = {"--kill_at_step": "on_step_end", "--kill_at_save": "on_save"}
    if len(sys.argv) < 4 or sys.argv[1] not in events:
        raise SystemExit(__doc__)
    run_pretrain(load_recipe(sys.argv[3], sys.argv[4:]), callbacks=[KillAtStep(int(sys.argv[2]), events[sys.argv[1]])])
