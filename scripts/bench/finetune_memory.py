"""Peak memory per rank of `megahf finetune`: full fine-tuning on one process against LoRA and QLoRA, on one process
and under FSDP2=2, on a BERT with random weights saved as a pretrained folder (`--hidden`, `--layers`).

Each configuration is a real run (`run_finetune` on the shipped SST-2 fixture, `--steps` optimizer steps of
`--micro` examples, AdamW) launched by torchrun, one run at a time. Every rank counts the bytes of the tensors torch
allocates (the profiler's memory events, as scripts/bench/loss_memory.py: every CPU allocation and free, so real
tensors and nothing else; on GPUs `torch.cuda.max_memory_allocated`), from before the model is loaded to the end:

* peak: the most bytes held at once during the whole run, loading and saving included;
* training peak: the most held between the first and the last optimizer step (the model, its gradients, the
  optimizer state and the activations of a step);
* model states: the bytes of this rank's parameters (its shards), of those trained (their gradients take as many
  during a step) and of the optimizer state after training, counted from the tensors.

    python scripts/bench/finetune_memory.py [--hidden 768 --layers 12 --micro 8 --steps 3] [--out DIR]

Writes finetune_memory.json (every figure) and finetune_memory.txt (the table) under --out (default
scripts/bench/results/). The ratios are against full fine-tuning on one process; the issue's goal for QLoRA under
FSDP2=2 is a peak of at most 0.35x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "glue" / "sst2.yaml"
GiB = 2**30
CONFIGS = {  # name: (processes, recipe keys)
    "full x1": (1, {"peft": "none"}),
    "lora x1": (1, {"peft": "lora"}),
    "qlora x1": (1, {"peft": "qlora"}),
    "full fsdp2": (2, {"peft": "none", "fsdp_size": 2}),
    "lora fsdp2": (2, {"peft": "lora", "fsdp_size": 2}),
    "qlora fsdp2": (2, {"peft": "qlora", "fsdp_size": 2}),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--micro", type=int, default=8, help="examples per micro-batch (global batch: 2x this)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a configuration's name: run it in this rank
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- one rank of one configuration


def tensor_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().nbytes() if local.numel() else 0


def model_states(trainer) -> dict[str, int]:
    """This rank's parameters, the trained ones among them and the optimizer state, in bytes, counted from the tensors
    (after training: Trainer has freed the gradients by then)."""
    import torch

    params = list(trainer.model.parameters())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"parameters": sum(tensor_bytes(p) for p in params),
            "trained_parameters": sum(tensor_bytes(p) for p in params if p.requires_grad),
            "optimizer_state": state}


def run_worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import TrainerCallback

    from megahf.training.finetune import load_finetune_recipe, run_finetune

    nproc, keys = CONFIGS[args.worker]
    values = {"model": args.model, "smoke": "true", "micro_batch_size": args.micro,
              "global_batch_size": 2 * args.micro, "train_steps": args.steps, "warmup_steps": 1, "eval_interval": 0,
              "log_interval": 1, "lora_rank": args.lora_rank, "lora_dropout": 0.0, "report_to": "none",
              "output_dir": Path(tempfile.mkdtemp(prefix="finetune_memory_")) / "out", **keys}
    overrides = [token for key, value in values.items() for token in (f"--{key}", str(value))]
    marks: dict[str, object] = {}

    class MarkTraining(TrainerCallback):  # a profiler range around the optimizer steps
        def on_train_begin(self, *a, **k):
            marks["range"] = record_function("finetune_memory.training")
            marks["range"].__enter__()
            if torch.cuda.is_available():
                marks["cuda_start"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, *a, **k):
            marks["range"].__exit__(None, None, None)
            if torch.cuda.is_available():
                marks["cuda_train_peak"] = torch.cuda.max_memory_allocated()

    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=not on_gpu, record_shapes=False) as prof:
        result = run_finetune(load_finetune_recipe(RECIPE, overrides), callbacks=[MarkTraining()])
    record = {"config": args.worker, "rank": int(os.environ.get("RANK", "0")), "layout": result.results["layout"],
              "peft": result.results["peft"], "model_states": model_states(result.trainer)}
    if on_gpu:
        record.update(source="torch.cuda.max_memory_allocated", peak_bytes=torch.cuda.max_memory_allocated(),
                      train_peak_bytes=marks["cuda_train_peak"])
    else:
        events = list(prof.profiler.kineto_results.events())
        window = next(e for e in events if e.name() == "finetune_memory.training")
        memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
        running = peak = train_peak = 0
        for event in memory:
            running += event.nbytes()
            peak = max(peak, running)
            if window.start_ns() <= event.start_ns() <= window.end_ns():
                train_peak = max(train_peak, running)
        record.update(source="torch.profiler memory events (CPU allocator)", peak_bytes=peak,
                      train_peak_bytes=train_peak)
    Path(str(args.result) % record["rank"]).write_text(json.dumps(record))  # one file per rank


# ---------------------------------------------------------------------- the launcher


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_model(args: argparse.Namespace, folder: Path) -> int:
    import torch

    from megahf.assets import load_bert_tokenizer
    from megahf.models.bert import MegatronBertConfig, MegatronBertForPreTraining

    tokenizer = load_bert_tokenizer()
    config = MegatronBertConfig.from_preset("bert-tiny", num_layers=args.layers, hidden_size=args.hidden,
                                            num_attention_heads=args.heads, vocab_size=len(tokenizer),
                                            pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    model = MegatronBertForPreTraining(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="finetune_memory_") as tmp:
        model = Path(tmp) / "pretrained"
        n_params = save_model(args, model)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for name, (nproc, _) in CONFIGS.items():
            result = Path(tmp) / f"{name.replace(' ', '_')}.rank%d.json"
            worker = [str(Path(__file__).resolve()), "--worker", name, "--model", str(model), "--hidden",
                      str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads), "--micro",
                      str(args.micro), "--steps", str(args.steps), "--lora-rank", str(args.lora_rank)]
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *worker, "--result",
                       str(result)]
            print(f"running {name} ...", flush=True)
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            records[name] = [json.loads(Path(str(result) % r).read_text()) for r in range(nproc)]

    base = max(r["peak_bytes"] for r in records["full x1"])
    base_train = max(r["train_peak_bytes"] for r in records["full x1"])
    lines = [f"torch {torch.__version__}; MegatronBert {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, "
             f"{args.layers} layers, vocabulary of the shipped WordPiece), fp32 weights, AdamW; {args.steps} steps of "
             f"a global batch of {2 * args.micro} on the SST-2 fixture; LoRA r={args.lora_rank} on linear_qkv, "
             "linear_proj, linear_fc1, linear_fc2, the head trained in full; QLoRA: the same on a 4-bit nf4 base",
             f"memory per rank: {records['full x1'][0]['source']}; ratios: the largest rank's against full "
             "fine-tuning on one process", "",
             f"{'configuration':<13} {'peak GiB':>9} {'ratio':>6} {'training peak GiB':>18} {'ratio':>6} "
             f"{'params GiB':>11} {'trained GiB':>12} {'optim GiB':>10}"]
    for name, ranks in records.items():
        peak = max(r["peak_bytes"] for r in ranks)
        train = max(r["train_peak_bytes"] for r in ranks)
        states = ranks[0]["model_states"]
        lines.append(f"{name:<13} {peak / GiB:>9.3f} {peak / base:>5.2f}x {train / GiB:>18.3f} "
                     f"{train / base_train:>5.2f}x {states['parameters'] / GiB:>11.3f} "
                     f"{states['trained_parameters'] / GiB:>12.3f} {states['optimizer_state'] / GiB:>10.3f}")
    table = "\n".join(lines) + "\n"
    print(table)
    (args.out / "finetune_memory.txt").write_text(table)
    (args.out / "finetune_memory.json").write_text(json.dumps(
        {"benchmark": "megahf.finetune_memory", "torch": torch.__version__, "parameters": n_params,
         **{k: v for k, v in vars(args).items() if k not in ("worker", "model", "result", "out")},
         "runs": records}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
