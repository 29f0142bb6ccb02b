"""nanotron 0.4 at TP=2 on 2 gloo ranks (tests/_nanotron_cpu.py), run by `torchrun` for test_nanotron_parallel.py.

Each rank builds nanotron's Llama at TP=2, fills it with nanotron's own loader from a TP=1 folder that megahf wrote
(nanotron reshards it from the tensor metadata: its resharding path), runs nanotron's forward, then saves the model
with nanotron's save_weights at TP=2. Rank 0 writes the gathered logits to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _nanotron_cpu import build_llama, cpu_parallel_context, import_nanotron, llama_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    dist.init_process_group("gloo")
    nt = import_nanotron()
    with pytest.MonkeyPatch.context() as patch, cpu_parallel_context(nt, patch, tensor_parallel_size=2) as context:
        written = json.loads((workdir / "from-megahf" / "model_config.json").read_text())
        known = {name for name in nt.LlamaConfig.__dataclass_fields__}
        config = nt.LlamaConfig(**{key: value for key, value in written.items() if key in known})
        model = build_llama(nt, context, config, torch.float32, seed=99 + dist.get_rank())  # overwritten below
        nt.load_weights(model=model, parallel_context=context, root_folder=workdir / "from-megahf")
        ids = torch.load(workdir / "ids.pt", weights_only=True)
        logits = llama_logits(model, ids, context.tp_pg)
        nt.save_weights(model=model, parallel_context=context, root_folder=workdir / "tp2")
        dist.barrier()
        if dist.get_rank() == 0:  # model_config.json as nanotron 0.4's trainer writes it
            (workdir / "tp2" / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
            torch.save(logits, workdir / "logits.pt")
            Path(args.out).write_text(json.dumps({"logits": str(workdir / "logits.pt"),
                                                  "tp": context.tp_pg.size()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
