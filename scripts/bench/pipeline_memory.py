"""Parameter + gradient + optimizer bytes per rank under pipeline parallelism (PP=2) against one process (PP=1),
counted on the real tensors after one real training step, for a tied and an untied GPT-2-shaped MegatronGPT.

Each layout is built as `megahf pretrain` builds it: the model from the seed on every rank, then (PP=2, two gloo
processes) `megahf.parallel.pipeline.build_pipeline` cuts it to the rank's stage and runs `Pipeline.train_step` (1F1B,
two micro-batches); PP=1 runs the model's own forward and backward. Then one step of fused AdamW (the Trainer's
`adamw_torch_fused`), so that every gradient and both AdamW moments exist, and each rank counts the bytes of its
parameters, gradients and optimizer state (each storage once: a tied weight of one process counts once), per part
of the model: the embedding (word + position), the decoder layers, the final norm and the output layer, which under
a pipeline with tied embeddings is the last stage's copy of the word embeddings (Megatron keeps one too, and sums
the two copies' gradients after every step).

    python scripts/bench/pipeline_memory.py [--hidden 512 --heads 8 --layers 12 --vocab 50257] [--out DIR]

Writes pipeline_memory.json and pipeline_memory.txt under --out (default scripts/bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

PARTS = ("embedding", "layers", "final norm", "output layer")
GOAL = 0.55  # issue #27: PP=2 holds at most this share of PP=1's bytes on its largest rank


def part_of(name: str) -> str:
    if name.startswith("model.embedding."):
        return "embedding"
    if name.startswith("model.decoder.layers."):
        return "layers"
    if name.startswith("model.decoder.final_layernorm."):
        return "final norm"
    if name.startswith("output_layer."):
        return "output layer"
    raise ValueError(f"parameter {name} belongs to no known part of the model")


def model_config(args, tied: bool):
    import megahf  # noqa: F401  (registers the models)
    from megahf import MegatronGPTConfig

    return MegatronGPTConfig.from_preset(
        "gpt-tiny", hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=4 * args.hidden, max_position_embeddings=args.positions, vocab_size=args.vocab,
        tie_word_embeddings=tied, hidden_dropout=0.0, attention_dropout=0.0)  # dropout off: the losses compare


def build_model(args, tied: bool):
    from megahf import MegatronGPTForCausalLM

    config = model_config(args, tied)
    torch.manual_seed(0)  # every rank builds the same model, as megahf pretrain does
    return MegatronGPTForCausalLM(config).train()


def batch(args, rows: int) -> dict:
    ids = torch.randint(0, args.vocab, (rows, args.seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def count(model, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state per part, each storage once (a tied weight of one process
    is one parameter); also the parameter count."""
    seen: set[int] = set()
    result = {part: {"params": 0, "grads": 0, "optimizer": 0, "numel": 0} for part in PARTS}

    def once(tensor: torch.Tensor) -> int:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return tensor.untyped_storage().nbytes()

    for name, param in model.named_parameters():  # named_parameters lists a shared parameter once
        part = result[part_of(name)]
        part["numel"] += param.numel()
        part["params"] += once(param)
        if param.grad is None:
            raise RuntimeError(f"{name} has no gradient after the step: the count would miss it")
        part["grads"] += once(param.grad)
        part["optimizer"] += sum(once(v) for v in optimizer.state[param].values() if isinstance(v, torch.Tensor))
    for part in result.values():
        part["total"] = part["params"] + part["grads"] + part["optimizer"]
    return result


def step(model, args, pipeline=None) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if pipeline is None:
        inputs = batch(args, args.micro_batches)
        loss = model(**inputs).loss
        loss.backward()
    else:
        loss = pipeline.train_step(batch(args, args.micro_batches))
    optimizer.step()
    return {"parts": count(model, optimizer), "loss": loss.item()}


def _worker(rank: int, world: int, port: int, args, tied: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megahf.parallel.layout import resolve_layout
    from megahf.parallel.pipeline import build_pipeline

    layout = resolve_layout(world_size=world, pipeline_parallel_size=world, micro_batch_size=1,
                            global_batch_size=args.micro_batches)
    model = build_model(args, tied)
    pipeline = build_pipeline(model, layout, torch.device("cpu"))
    result = step(model, args, pipeline)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def total(parts: dict, key: str = "total") -> int:
    return sum(part[key] for part in parts.values())


def report(args, results: dict) -> str:
    padded = model_config(args, True).padded_vocab_size
    lines = [f"MegatronGPT (GPT-2 shape) hidden {args.hidden}, {args.heads} heads, {args.layers} layers, vocabulary "
             f"{args.vocab} (padded to {padded}), {args.positions} positions, seq {args.seq}, fp32 weights, fused "
             f"AdamW; torch {torch.__version__}. Bytes after one training step ({args.micro_batches} micro-batches of "
             "1; PP=2: 1F1B on 2 gloo processes), each storage counted once.", ""]
    header = (f"{'layout':14} {'rank':>4} " + " ".join(f"{part:>14}" for part in PARTS)
              + f" {'total':>14} {'params':>12}")
    for tied in (True, False):
        name = "tied" if tied else "untied"
        single, ranks = results[name]["pp1"], results[name]["pp2"]
        lines += [f"{name} embeddings: parameter + gradient + optimizer bytes per part", header]
        for label, rank, parts in [("PP=1", 0, single)] + [("PP=2", r, p["parts"]) for r, p in enumerate(ranks)]:
            lines.append(f"{label:14} {rank:>4} " + " ".join(f"{parts[part]['total']:>14,}" for part in PARTS)
                         + f" {total(parts):>14,} {total(parts, 'numel'):>12,}")
        base = total(single)
        largest = max(total(p["parts"]) for p in ranks)
        ratio = largest / base
        results[name]["ratio"] = ratio
        lines.append(f"  largest PP=2 rank / PP=1: {largest:,} / {base:,} = {ratio:.3f} "
                     f"(goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
        losses = [p["loss"] for p in ranks]
        lines.append(f"  loss of the step: PP=1 {results[name]['pp1_loss']:.6f}, PP=2 {losses[0]:.6f} (every rank "
                     "reports the last stage's)")
        if tied:
            first, last = ranks[0]["parts"], ranks[-1]["parts"]
            copy = last["output layer"]["total"]
            lines.append(f"  the last stage's copy of the tied word embeddings (weight, gradient, 2 AdamW moments): "
                         f"{copy:,} bytes, {copy / total(last):.1%} of that rank")
            lines.append(f"  without the copy the last rank would hold {total(last) - copy:,}; the largest rank is the "
                         f"{'first' if total(first) >= total(last) else 'last'} either way (arithmetic on the counts)")
            embedding_share = single["embedding"]["total"] / base
            lines.append(f"  the embedding is {embedding_share:.1%} of PP=1's bytes; the first stage holds it whole "
                         "beside half the layers, about (E + L/2) / (E + L) of one process (E the embedding, L the "
                         "layers): <= 0.55 only where E <= L/9")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2's; the model pads it to a multiple of 128")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample of the step")
    parser.add_argument("--positions", type=int, default=1024, help="learned position embeddings (GPT-2's 1024)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches of one sample in the step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(REPO / "scripts" / "bench" / "results"))
    args = parser.parse_args()
    if args.layers % 2:
        parser.error(f"--layers {args.layers} is odd: two pipeline stages need an even number of layers")
    if args.seq > args.positions:
        parser.error(f"--seq {args.seq} is longer than --positions {args.positions}; lower --seq")
    if args.micro_batches < 2:
        parser.error(f"--micro-batches {args.micro_batches}: two pipeline stages need at least 2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    results = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        print(f"{name}: PP=1 ...", file=sys.stderr, flush=True)
        single = step(build_model(args, tied), args)
        print(f"{name}: PP=2 (2 processes, gloo) ...", file=sys.stderr, flush=True)
        partial = out_dir / f".pipeline-memory-{name}.partial.json"
        mp.spawn(_worker, args=(2, free_port(), args, tied, str(partial)), nprocs=2, join=True)
        results[name] = {"pp1": single["parts"], "pp1_loss": single["loss"], "pp2": json.loads(partial.read_text())}
        partial.unlink()

    text = report(args, results)
    print(text)
    from megahf.atomic import atomic_write_json, atomic_write_text

    settings = {key: value for key, value in vars(args).items() if key != "out"}  # not the machine's path
    atomic_write_json(out_dir / "pipeline_memory.json", {"args": settings, "results": results})
    atomic_write_text(out_dir / "pipeline_memory.txt", text + "\n")


if __name__ == "__main__":
    main()
