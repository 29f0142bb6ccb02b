"""`save_final` on 2 gloo ranks with a slow rank 1: run by `torchrun` for test_save_final_parallel.py.

transformers' `save_pretrained` lists the target folder on every rank, the non-main ones included. Rank 1 here does
that 2 s late (as a loaded machine made it do), so a rank 0 that published `final/` without waiting for it would pull
the folder away under it. Rank 0 writes what it finds to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from megahf.training.outputs import save_final


class SlowModel:
    def save_pretrained(self, folder, is_main_process: bool) -> None:
        os.makedirs(folder, exist_ok=True)
        if not is_main_process:
            time.sleep(2.0)
        os.listdir(folder)  # what transformers does on every rank before writing
        if is_main_process:
            Path(folder, "model.safetensors").write_bytes(b"weights")


class Tokenizer:
    def save_pretrained(self, folder) -> None:
        Path(folder, "tokenizer.json").write_text("{}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    final = save_final(SlowModel(), Tokenizer(), Path(args.workdir))
    dist.barrier()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"files": sorted(os.listdir(final))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
