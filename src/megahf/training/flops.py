"""Model FLOPs per token and device peaks, for the model FLOPs utilisation (MFU) in the logs and benchmarks.

Model FLOPs count what the model needs, not what the hardware does: recomputation (`recompute: selective | full`)
is not counted (PaLM's MFU, Megatron's "model FLOPs"). Per token of a training step (forward + backward = 3 x the
forward's 2 FLOPs per multiply-add):

    6 x N_matmul + 12 x layers x hidden x seq_length

N_matmul is the weights of every matrix multiply: the attention and MLP projections of each layer and the output
layer over the padded vocabulary (the embedding lookups are no multiply). The second term is the attention scores
and their weighted sum (Q K^T and A V: 2 x 2 x seq x hidden per layer forward), Megatron's (Narayanan et al. 2021)
without discount for the causal mask. A masked LM needs the output layer only at its labeled positions
(`output_fraction`: BERT's `mask_prob`, 15%), whatever the implementation computes there: megahf's BERT with
`loss_chunk_size` runs it on those alone; Megatron and the plain head on every position, which counts as waste.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from ..parallel.ranks import barrier, is_distributed, local_world_size, sum_over_ranks

# Dense bf16 peak of one GPU in TFLOP/s (vendor data sheets, without sparsity), matched on the device name.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16 tensor cores
}


def matmul_parameters(config, output_fraction: float = 1.0) -> float:
    """Weights that take part in a matrix multiply per token (see the module docstring), the output layer's counted
    at `output_fraction` of the tokens."""
    h, layers = config.hidden_size, config.num_layers
    head_dim = config.head_dim
    qkv = h * (config.num_attention_heads + 2 * config.num_query_groups) * head_dim
    proj = config.num_attention_heads * head_dim * h
    mlp_matrices = 3 if config.activation == "swiglu" else 2
    mlp = mlp_matrices * h * config.ffn_hidden_size
    return layers * (qkv + proj + mlp) + output_fraction * config.padded_vocab_size * h


def training_flops_per_token(config, seq_length: int, output_fraction: float = 1.0) -> float:
    return (6.0 * matmul_parameters(config, output_fraction)
            + 12.0 * config.num_layers * config.hidden_size * seq_length)


def gpu_peak_tflops(name: str) -> float | None:
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def measure_cpu_matmul_tflops(size: int = 1024, repeats: int = 20, threads: int | None = None,
                              sync: Callable[[], None] | None = None) -> float:
    """This process's fp32 matmul rate in TFLOP/s: the best of `repeats` timed size x size matmuls on `threads`
    threads (default: every core), after warm-up (a cold start measures ~25% low; the whole takes about 0.5 s).

    `sync` (e.g. a barrier) runs before each matmul: the processes of a launch that share a machine then time their
    matmuls at the same moments, so that each measures what it can do while the others compute too (without it,
    the best of a process's repeats can fall where another process is between matmuls, and a process's timing
    depends on what the others do meanwhile)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    sync = sync or (lambda: None)
    try:
        a, b = torch.randn(size, size, generator=torch.Generator().manual_seed(0)), torch.randn(size, size)
        for _ in range(3):
            sync()
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / best / 1e12


def peak_tflops_per_device(recipe_value: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from). On CPU the 'device' is the whole machine, measured
    by this process alone (a launch of several processes measures with all of them: `launch_peak_tflops`)."""
    if recipe_value > 0:
        return recipe_value, "recipe peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name)
        if peak is not None:
            return peak, f"{name} bf16 dense peak"
        return float("nan"), f"{name}: unknown peak, set peak_tflops"
    return measure_cpu_matmul_tflops(), f"fp32 matmul measured on {os.cpu_count()} cores"


def launch_peak_tflops(recipe_value: float = 0.0) -> tuple[float, str, int]:
    """(peak TFLOP/s of one device, its source, devices) for MFU of a launch of any number of processes.

    GPU, or a peak given in the recipe: that figure per device, every process a device. CPU: a device is a machine,
    and its peak is measured by every process of the launch at once, each with the threads it trains with, summed
    over the processes of the machine (the fp32 rate the run's processes can reach together). One process measures
    with every core, as it trains. Collective: every rank calls it."""
    world = torch.distributed.get_world_size() if is_distributed() else 1
    if recipe_value > 0 or torch.cuda.is_available():
        tflops, source = peak_tflops_per_device(recipe_value)
        return tflops, source, world
    machines = max(1, world // local_world_size())
    threads = torch.get_num_threads() if world > 1 else (os.cpu_count() or 1)
    total = sum_over_ranks(measure_cpu_matmul_tflops(threads=threads, sync=barrier))
    source = (f"fp32 matmul measured on {os.cpu_count()} cores" if world == 1 else
              f"fp32 matmul measured by {world // machines} processes at once, {threads} thread(s) each")
    return total / machines, source, machines


__all__ = ["GPU_PEAK_TFLOPS", "gpu_peak_tflops", "launch_peak_tflops", "matmul_parameters", "measure_cpu_matmul_tflops",
           "peak_tflops_per_device", "training_flops_per_token"]
