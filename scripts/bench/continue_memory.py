"""Peak memory per rank while a checkpoint is loaded for continued pretraining, against the shard each rank keeps.

A transformers LlamaForCausalLM (grouped-query attention, bf16 safetensors as Llama checkpoints are published; the
shape is set by the flags) is saved to a temporary folder and loaded as `megahf pretrain
--model FOLDER` loads it (`megahf.training.setup.build_model`, fp32 weights), at one process, TP=2 and TP=2 x FSDP=2
(gloo, CPU processes). On each rank:

* shard: the bytes of the parameters the rank holds (its local shards, fp32);
* peak: the rise of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs just before
  the load) over its resident set then, i.e. the most memory the load ever added, file pages of the memory-mapped
  safetensors included;
* for contrast, the same for loading the way a freshly initialised model is sharded: every rank loads the whole
  model (`load_into_layout` without a layout), then shards it (`distribute_model`).

    python scripts/bench/continue_memory.py [--hidden 1024 --layers 8 --vocab 32000] [--out DIR]

Writes continue_memory.json (every figure) and continue_memory.txt (the table) under --out (default
scripts/bench/results/). Linux only (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

LAYOUTS = {"one process": (1, {}), "TP=2": (2, {"tensor_parallel_size": 2}),
           "TP=2 x FSDP=2": (4, {"tensor_parallel_size": 2, "fsdp_size": 2})}
MIB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Reset VmHWM to the current resident set; return that resident set (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def peak_rise(baseline: int) -> int:
    return status_kib("VmHWM") * 1024 - baseline


def save_checkpoint(folder: Path, args) -> int:
    import transformers

    from megahf.assets import load_gpt2_tokenizer

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.groups,
                                      vocab_size=args.vocab, tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    load_gpt2_tokenizer().save_pretrained(folder)  # a tokenizer of no more ids than the vocabulary, for the run's checks
    return n


def _rank(rank: int, world: int, port: int, folder: str, keys: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megahf import MegatronGPTForCausalLM
    from megahf.parallel import distribute_model
    from megahf.parallel.load_shards import load_into_layout, local_block
    from megahf.training.model_source import read_checkpoint_model
    from megahf.training import load_recipe
    from megahf.training.setup import build_layout, build_model, load_tokenizer

    values = {"model": folder, "tokenizer": folder, "warmup_steps": 1, "output_dir": os.path.join(folder, "run"),
              **keys}
    recipe = load_recipe(None, [t for k, v in values.items() for t in (f"--{k}", str(v))])
    tokenizer = load_tokenizer(recipe)
    layout = build_layout(recipe)
    baseline = reset_peak()
    model = build_model(recipe, tokenizer, layout)
    loaded_peak = peak_rise(baseline)
    shard = sum(local_block(p)[0].numel() * p.element_size() for p in model.parameters())
    del model
    baseline = reset_peak()
    loaded = read_checkpoint_model(recipe.model)
    whole = load_into_layout(MegatronGPTForCausalLM, loaded.config, loaded.tensors)  # the whole model on every rank
    model = distribute_model(whole, layout.distributed_config()) if layout.sharded else whole
    whole_peak = peak_rise(baseline)
    del whole, model
    result = torch.tensor([shard, loaded_peak, whole_peak], dtype=torch.float64)
    gathered = [torch.zeros_like(result) for _ in range(world)]
    dist.all_gather(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps([g.tolist() for g in gathered]))
    dist.barrier()
    dist.destroy_process_group()


def report(args, parameters: int, results: dict, load: tuple) -> str:
    lines = [f"Loading a transformers LlamaForCausalLM ({parameters / 1e6:.1f}M parameters: hidden {args.hidden}, "
             f"{args.layers} layers, {args.heads} heads in {args.groups} groups, FFN {args.ffn}, vocabulary "
             f"{args.vocab}; bf16 safetensors) for continued pretraining, fp32 weights, gloo on CPU "
             f"(load average {load[0]:.1f} at start). MiB per rank; peak = rise of the peak resident set during the "
             "load.",
             f"{'layout':16s} {'rank':>4s} {'shard':>9s} {'peak (megahf)':>14s} {'peak/shard':>11s} "
             f"{'peak (whole, then shard)':>25s} {'ratio':>6s}"]
    for name, ranks in results.items():
        for rank, (shard, peak, whole) in enumerate(ranks):
            lines.append(f"{name:16s} {rank:4d} {shard / MIB:9.1f} {peak / MIB:14.1f} {peak / shard:11.2f} "
                         f"{whole / MIB:25.1f} {whole / shard:6.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=51200)
    parser.add_argument("--out", default=str(REPO / "scripts" / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        parameters = save_checkpoint(folder, args)
        for name, (world, keys) in LAYOUTS.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            out = Path(tmp) / "ranks.json"
            mp.spawn(_rank, args=(world, free_port(), str(folder), keys, str(out)), nprocs=world, join=True)
            results[name] = json.loads(out.read_text())
    text = report(args, parameters, results, load)
    print(text)
    from megahf.atomic import atomic_write_json, atomic_write_text

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    atomic_write_json(out_dir / "continue_memory.json", {"args": settings, "parameters": parameters,
                                                         "load_average": load[0], "results": results}, indent=2)
    atomic_write_text(out_dir / "continue_memory.txt", text + "\n")


if __name__ == "__main__":
    main()
