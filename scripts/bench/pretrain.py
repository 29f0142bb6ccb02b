#!/usr/bin/env python
"""Throughput (tokens/s) and model FLOPs utilisation (MFU) of `megahf pretrain`, one process against tensor parallel.

Runs `megahf pretrain` as a user does (one process; `torchrun` for TP=2) on two recipes, and reads tokens/s and MFU
from each run's metrics.json (steady state: the first logged interval, which carries the start-up, is left out;
evaluation and checkpointing are off). MFU is each job's model TFLOP/s over the peak: on CPU the best fp32 matmul
rate of this machine on all its cores (`megahf.training.flops.measure_cpu_matmul_tflops`) seen in this run, measured
before every job and after the last (other work on the machine only lowers a measurement, so the best one is the
closest to the peak); on a GPU the bf16 peak of megahf's table.

    python scripts/bench/pretrain.py                       # CPU: tiny and small recipes, 1 process and TP=2
    python scripts/bench/pretrain.py --steps 40 --out scripts/bench/results/pretrain_cpu
    python scripts/bench/pretrain.py --configs gpt-345m --layouts 1 --steps 30     # on one GPU
    python scripts/bench/pretrain.py --configs gpt-345m,gpt-1.2b --layouts 1 \
        --variants chunked,plain,compiled,compiled-plain

Each job's peak memory (`peak_memory_gib` of metrics.json: torch's `max_memory_allocated` on a GPU, the process's
peak resident set on CPU) is reported beside its speed. Variants (`--variants`, default `chunked`: as the recipes
train): `chunked` (`loss_chunk_size: 1024`), `plain` (`loss_chunk_size: 0`: the full logits), `compiled` and
`compiled-plain` (the same with `compile: true`); on CPU also `system-malloc` (chunked, with glibc's default
allocator: `MEGAHF_CPU_MALLOC=system`) and `no-dropout` (chunked, dropout 0: what dropout's masks cost).

Configurations ("tiny" is recipes/gpt/tiny.yaml as shipped; the others are recipe files with model overrides; the
GPU ones run one optimizer step per micro-batch of 8 and, for gpt-1.2b, without the recipe's full recompute, which
one 80 GB+ GPU does not need at that batch and which would cost a third more compute than MFU counts):
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "tiny": ("recipes/gpt/tiny.yaml", {}),
    "small": ("recipes/gpt/tiny.yaml", {"model_overrides.hidden_size": 256, "model_overrides.num_layers": 6,
                                        "seq_length": 256}),
    "gpt-345m": ("recipes/gpt/gpt-345m.yaml", {"micro_batch_size": 8, "global_batch_size": 8}),
    "gpt-1.2b": ("recipes/gpt/gpt-1.2b.yaml", {"micro_batch_size": 8, "global_batch_size": 8, "recompute": "none"}),
}
# variant: (recipe keys, environment)
VARIANTS = {
    "chunked": ({"loss_chunk_size": 1024}, {}),
    "plain": ({"loss_chunk_size": 0}, {}),
    "compiled": ({"loss_chunk_size": 1024, "compile": "true"}, {}),
    "compiled-plain": ({"loss_chunk_size": 0, "compile": "true"}, {}),
    "system-malloc": ({"loss_chunk_size": 1024}, {"MEGAHF_CPU_MALLOC": "system"}),
    "no-dropout": ({"loss_chunk_size": 1024, "model_overrides.hidden_dropout": 0.0,
                    "model_overrides.attention_dropout": 0.0}, {}),
}
__doc__ += "\n".join(f"    {name}: {recipe} {overrides or ''}" for name, (recipe, overrides) in CONFIGS.items())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(config: str, variant: str, tp: int, steps: int, peak: float, workdir: Path, log) -> dict:
    recipe, overrides = CONFIGS[config]
    out = workdir / f"{config}-{variant}-tp{tp}"
    keys = {"train_steps": steps, "warmup_steps": 1, "log_interval": max(1, steps // 6), "eval_interval": 0,
            "sample_tokens": 0, "save_interval": 0, "resume": "none", "report_to": "none", "output_dir": out,
            "peak_tflops": peak, "tensor_parallel_size": tp, "eval_iters": 1, **overrides, **VARIANTS[variant][0]}
    args = [token for key, value in keys.items() for token in (f"--{key}", str(value))]
    entry = ["-m", "megahf", "pretrain", str(ROOT / recipe), *args]
    threads = os.cpu_count() or 1
    if tp == 1:
        cmd = [sys.executable, *entry]
        env_threads = threads
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *entry]
        env_threads = max(1, threads // tp)  # the cores are shared out between the ranks
    env = {**os.environ, "OMP_NUM_THREADS": str(env_threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **VARIANTS[variant][1]}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    text = f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n"
    # The saved log names no folder of this machine.
    log.write(text.replace(sys.executable, "python").replace(str(workdir), "$TMP").replace(str(ROOT), "."))
    if proc.returncode != 0:
        raise SystemExit(f"{config} {variant} tp={tp} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"config": config, "variant": variant, "tensor_parallel_size": tp, "threads_per_process": env_threads,
            "parameters": metrics["parameters"], "tokens_per_second": metrics["tokens_per_second"],
            "model_tflops_per_second": metrics["model_tflops_per_second"], "mfu": metrics["mfu"],
            "peak_memory_gib": metrics["peak_memory_gib"], "peak_memory_source": metrics["peak_memory_source"],
            "final_train_loss": metrics["final_train_loss"], "job_seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,small", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--layouts", default="1,2", help="tensor-parallel sizes (processes), comma-separated")
    p.add_argument("--variants", default="chunked", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over all jobs (interleaved); each job's best round is reported")
    p.add_argument("--out", default="", help="write OUT.json (results) and OUT.log (every job's output)")
    args = p.parse_args()

    from megahf.training.flops import measure_cpu_matmul_tflops, peak_tflops_per_device

    on_gpu = torch.cuda.is_available()
    peaks: list[float] = []

    def measure_peak() -> float:
        if on_gpu:
            peaks.append(peak_tflops_per_device()[0])
        else:
            peaks.append(max(measure_cpu_matmul_tflops() for _ in range(3)))
        return max(peaks)

    source = peak_tflops_per_device()[1] if on_gpu else (
        f"fp32 matmul on {os.cpu_count()} cores, best seen in this run")
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load_before:.1f}", flush=True)

    log_path = Path(args.out + ".log") if args.out else Path(os.devnull)
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
        best: dict[tuple[str, str, int], dict] = {}
        jobs = [(config, variant, int(tp)) for config in args.configs.split(",")
                for variant in args.variants.split(",") for tp in args.layouts.split(",")]
        for round_ in range(args.repeats):
            for job in jobs:
                config, variant, tp = job
                result = run_job(config, variant, tp, args.steps, measure_peak(), Path(tmp), log)
                result["rounds_tokens_per_second"] = best.get(job, {}).get("rounds_tokens_per_second", []) + [
                    result["tokens_per_second"]]
                if result["tokens_per_second"] >= best.get(job, {}).get("tokens_per_second", 0):
                    best[job] = result
                else:
                    best[job]["rounds_tokens_per_second"] = result["rounds_tokens_per_second"]
                print(f"  round {round_ + 1}: {config} {variant} tp={tp}: {result['tokens_per_second']:,.0f} "
                      f"tokens/s, {result['model_tflops_per_second']:.4f} model TFLOP/s, peak memory "
                      f"{result['peak_memory_gib']:.2f} GiB ({result['job_seconds']:.0f} s; peak so far "
                      f"{max(peaks):.4f})", flush=True)
        results = list(best.values())
    peak = measure_peak()
    for result in results:  # against the best peak of the whole run
        result["mfu"] = result["model_tflops_per_second"] / peak
    load_after = os.getloadavg()[0]

    print(f"\n| config | variant | parameters | processes (TP) | threads/process | tokens/s (best of {args.repeats}) | "
          "model TFLOP/s | MFU | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['config']} | {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['tensor_parallel_size']} | "
              f"{r['threads_per_process']} | {r['tokens_per_second']:,.0f} | {r['model_tflops_per_second']:.4f} | "
              f"{r['mfu']:.2%} | {r['peak_memory_gib']:.2f} |")
    print(f"peak memory: {results[0]['peak_memory_source']} of rank 0" if results else "")
    print(f"\npeak {peak:.4f} TFLOP/s ({source}); load average {load_before:.1f} before, {load_after:.1f} after")
    report = {"torch": torch.__version__, "cores": os.cpu_count(), "peak_tflops": peak, "peak_source": source,
              "peak_measurements": peaks, "steps": args.steps, "load_average": [load_before, load_after],
              "results": results}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    print("JSON " + json.dumps(report))


if __name__ == "__main__":
    main()
