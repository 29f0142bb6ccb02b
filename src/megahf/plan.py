"""`megahf plan`: every parallel layout of a model on N GPUs, which fit in memory, ranked by predicted step time.

    megahf plan --model gpt-8.3b --gpus 512 --gpu v100 --gpu-memory 32GB --nodes 32 --seq 1024 --global-batch 512

A layout is tensor parallel t (within a node), FSDP f (shards weights, gradients and optimizer state over f of the
data-parallel ranks), data parallel d = N / (t p), sequence parallel (t >= 2), recompute (none |
selective | full), the micro batch b (global batch = b x d x accumulation) and pipeline parallel p (the outermost
dimension; its m micro-batches per step are the accumulation, at least p; the schedule 1F1B, or interleaved 1F1B with
v chunks per rank and m a multiple of p; p v divides the layers). Pipelines follow Megatron's advice (Narayanan et al.
2021, section 3.3): they are considered only when no layout fits with its TP x FSDP groups within one node, and then
at the largest TP degree of a node; never for BERT or a recipe that compiles (megahf's pipeline refuses both).

Memory per GPU, in bytes, as megahf trains on GPUs (bf16 autocast: the weights stay fp32 and are the master copy):
    weights 4 P_local, gradients 4 P_local, optimizer 8 P_local (Adam's two fp32 moments), P_local = the
    tensor-parallel shards (/ t) plus what every TP rank holds whole (norms, row-parallel biases, positions), / f.
    activations per layer (Korthikanti et al. 2022, Table 2, 16-bit activations with 1-byte dropout masks; without
    dropout the masks and the dropout outputs drop out: `activation_bytes_per_layer`), x layers:
        none:      s b h (34 + 5 a s / h)          t > 1: s b h (10 + 24 / t + 5 a s / (h t))
        SP:        s b h (34 + 5 a s / h) / t
        selective: s b h (10 + 24 / t)             with SP: 34 s b h / t
        full:      2 s b h (the layer inputs)      with SP: 2 s b h / t
    That is `--attention eager`, the paper's attention, which keeps the [s, s] scores, softmax and dropout of every
    head. megahf runs SDPA (`--attention sdpa`, the default), whose fused kernel keeps none of them (the scores are
    recomputed in its backward, the dropout mask is drawn from a seed): the 5 a s / h term becomes 4 + 4 a / h (its
    output, and the query copy megahf's fused-QKV split makes, 2 bytes each; the log-sum-exp, 4 bytes per head and
    token), and 4 with selective recompute (the output is recomputed), each / t: linear in s, which is what makes long
    sequences fit (at s = 4096 with Llama-8B's 32 heads of 128 and no dropout the eager term is 2 a s / h = 64, twice
    the rest of the layer's 32). Checked on CPU, where torch's SDPA runs its flash kernel (tests/test_plan.py).
    logits/loss, with the chunked loss (`--loss-chunk-size C`, the recipes' default 1024; `chunked_loss.py`):
        min(C, s b) V_padded / t x 6 (one chunk's bf16 logits 2 + their fp32 softmax 4) + V_padded / t x h x 12 (the
        output weight's bf16 copy 2, its fp32 gradient accumulator 4, a chunk's bf16 product 2 and its fp32 sum 4);
        with the plain loss (C = 0): s b V_padded / t x 12 (at the backward's peak: the fp32 log-softmax kept for
        it 4, the loss's dense fp32 gradient with respect to it 4 and the logits' fp32 gradient 4); the
        vocabulary-parallel loss never gathers them. Both are checked against torch's allocator (tests/test_plan.py)
    framework overhead: OVERHEAD_GB (CUDA context, NCCL and allocator slack).
    Under pipeline parallelism, per pipeline rank (the plan shows the largest): its layers / p layers; the word and
    position embeddings on the first, the final norm and output layer on the last (with tied embeddings a copy of the
    word embedding, whose gradients the two all-reduce, as Megatron); the logits term on the last only; activations of
    the layers' micro-batches in flight (Korthikanti et al. 2022, section 4.2.3, `in_flight_layers`): the first 1F1B
    stage keeps p micro-batches of layers / p layers, num_layers' worth whatever p is, interleaved (1 + (p - 1) /
    (p v)) times that, GPipe m / p times.
Step time (seconds) = compute + tensor-parallel communication + exposed data-parallel communication, with
    compute = hardware FLOPs / (N x peak x efficiency); hardware FLOPs = model FLOPs (`flops.py`: 6 N_matmul +
        12 l h s per token) plus the recomputed forward (full: + the layers' forward; selective: + the attention
        scores' forward);
    TP: per layer and micro batch 4 all-reduces of s b h x 2 bytes (2 forward, 2 backward; SP's all-gathers and
        reduce-scatters move the same), 2 more with full recompute, each 2 (t - 1) / t x bytes / NVLink bandwidth;
    DP: the fp32 gradients' all-reduce over the replicas once per step, 2 (r - 1) / r x bytes / bandwidth, overlapped
        with the last micro batch's backward (only the excess counts); FSDP: per micro batch the fp32 weights
        all-gathered twice (forward, backward) and the gradients reduce-scattered, 3 (f - 1) / f x bytes /
        bandwidth, not overlapped (FSDP2 prefetches one layer ahead: a bound, not an estimate). The bandwidth of a
        group within one node is NVLink's, across nodes the node's network (per-GPU link x GPUs per node: NCCL
        drives one link per GPU).
    PP: the slowest stage paces the pipeline: the last, with its layers and the output layer (compute = its FLOPs /
        (N / p GPUs x peak x efficiency)); each chunk sends s b h bf16 values forward and their gradient back per
        micro batch (2 v m sends, not overlapped: a bound) over NVLink on one node, else the network; the bubble
        idles (p - 1) / v micro-batch slots of m (Narayanan et al. 2021, section 2.2), (p - 1) / (v m + p - 1) of
        the step: `bubble_fraction`, (p - 1) / (m + p - 1) for 1F1B.
Constants per GPU (`GPUS`): dense bf16/fp16 peak (data sheets), efficiency (what Megatron reached: one V100 30% of
peak in Shoeybi et al. 2019; 44-52% on A100 in Narayanan et al. 2021; 41-48% on H100 for Megatron-Core), NVLink
bus bandwidth per GPU, and the network per GPU of the systems those papers used (DGX-2H: 8 x 100 Gb/s for 16 V100;
DGX A100: 200 Gb/s per GPU; DGX H100/H200: 400 Gb/s per GPU).

Among layouts of equal predicted time (to 4 digits), the one with fewer pipeline stages and chunks, less FSDP, less
tensor parallelism, less recompute and the larger micro batch ranks first (fewer moving parts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MegahfError

GB = 1e9
OVERHEAD_GB = 2.0
RECOMPUTE = ("none", "selective", "full")
ATTENTIONS = ("sdpa", "eager")


class PlanError(MegahfError, ValueError):
    """Bad input to `megahf plan` (the message names the flag, the value and the fix)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float  # dense bf16 (fp16 for V100)
    efficiency: float  # share of the peak a well-sized layout reaches
    nvlink_gbps: float  # bus bandwidth per GPU within a node, GB/s
    network_gbps: float  # network bandwidth per GPU across nodes, GB/s
    memory_gb: float  # the usual card


GPUS = {
    "v100": Gpu("v100", 125.0, 0.30, 150.0, 6.25, 32.0),
    "a100": Gpu("a100", 312.0, 0.50, 300.0, 25.0, 80.0),
    "h100": Gpu("h100", 989.0, 0.45, 450.0, 50.0, 80.0),
    "h200": Gpu("h200", 989.0, 0.45, 450.0, 50.0, 141.0),
}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model config."""

    hidden: int
    layers: int
    heads: int
    query_groups: int
    ffn: int
    head_dim: int
    padded_vocab: int
    max_positions: int
    learned_positions: bool
    layernorm_bias: bool  # LayerNorm has a bias, RMSNorm none
    bias: bool
    swiglu: bool
    tied: bool
    dropout: bool

    @classmethod
    def of(cls, config) -> Shape:
        return cls(hidden=config.hidden_size, layers=config.num_layers, heads=config.num_attention_heads,
                   query_groups=config.num_query_groups, ffn=config.ffn_hidden_size, head_dim=config.head_dim,
                   padded_vocab=config.padded_vocab_size, max_positions=config.max_position_embeddings,
                   learned_positions=getattr(config, "position_embedding_type",
                                             "learned_absolute") == "learned_absolute",
                   layernorm_bias=getattr(config, "normalization", "LayerNorm") == "LayerNorm",
                   bias=config.add_bias_linear, swiglu=config.activation == "swiglu", tied=config.tie_word_embeddings,
                   dropout=config.hidden_dropout > 0 or config.attention_dropout > 0)

    def layer_parameters(self) -> tuple[int, int]:
        """One layer's (parameters split over the TP ranks, held whole by every rank)."""
        h, qkv_out = self.hidden, (self.heads + 2 * self.query_groups) * self.head_dim
        fc1_out = self.ffn * (2 if self.swiglu else 1)
        split = h * qkv_out + self.heads * self.head_dim * h + h * fc1_out + self.ffn * h  # column and row weights
        whole = 2 * h * (2 if self.layernorm_bias else 1)  # two norms
        if self.bias:
            split += qkv_out + fc1_out  # column-parallel biases are split
            whole += 2 * h  # row-parallel biases are added after the reduction: whole
        return split, whole

    def parameters(self, tp: int = 1) -> tuple[int, int]:
        """(parameters split over the TP ranks, held whole by every rank), summed over the model."""
        return self.stage_parameters(1, 0)

    def stage_parameters(self, pp: int, rank: int) -> tuple[int, int]:
        """(split, whole) of pipeline rank `rank` of `pp`: its num_layers / pp layers (whatever its chunks), the word
        and position embeddings on the first, the final norm and the output layer on the last; with tied embeddings
        and pp > 1 the last holds a copy of the word embedding as its output layer (Megatron's)."""
        split, whole = self.layer_parameters()
        split, whole = split * self.layers // pp, whole * self.layers // pp
        embedding = self.padded_vocab * self.hidden
        if rank == 0:
            split += embedding
            whole += self.max_positions * self.hidden if self.learned_positions else 0
        if rank == pp - 1:
            split += embedding if (pp > 1 or not self.tied) else 0
            whole += self.hidden * (2 if self.layernorm_bias else 1)  # the final norm
        return split, whole

    def parameters_per_gpu(self, tp: int, fsdp: int, pp: int = 1, rank: int = 0) -> float:
        split, whole = self.stage_parameters(pp, rank)
        return (split / tp + whole) / fsdp


@dataclass(frozen=True)
class Layout:
    tp: int
    fsdp: int
    dp: int
    sequence_parallel: bool
    recompute: str
    micro_batch: int
    accumulation: int  # under pipeline parallelism: the micro-batches that flow through the stages in one step
    pp: int = 1
    virtual: int = 1  # model chunks per pipeline rank (interleaved-1f1b)
    schedule: str = "1f1b"

    def describe(self) -> str:
        parts = []
        if self.pp > 1:
            chunks = f" x {self.virtual} chunks" if self.virtual > 1 else ""
            parts.append(f"PP {self.pp}{chunks} ({self.schedule})")
        parts += [f"TP {self.tp}", f"DP {self.dp}"]
        if self.fsdp > 1:
            parts.append(f"FSDP {self.fsdp}")
        if self.sequence_parallel:
            parts.append("SP")
        parts.append(f"recompute {self.recompute}")
        if self.pp > 1:
            parts.append(f"micro {self.micro_batch} x {self.accumulation} micro-batches")
        else:
            parts.append(f"micro {self.micro_batch} x acc {self.accumulation}")
        return ", ".join(parts)


def in_flight_layers(layers: int, pp: int, virtual: int, schedule: str, micro_batches: int, rank: int) -> float:
    """How many layers' activations of one micro batch pipeline rank `rank` keeps at its peak (Korthikanti et al.
    2022, section 4.2.3; the warm-up counts of torch.distributed.pipelining's schedules, which are Megatron's):
    1F1B runs min(pp - rank, m) forwards before its first backward, each through its layers / pp: the first stage
    holds num_layers' worth whatever pp is; interleaved 1F1B runs (v - 1) pp + 2 (pp - 1 - rank) + 1 chunk forwards
    of layers / (pp v), the first stage's layers (1 + (pp - 1) / (pp v)); GPipe keeps all m. Without a pipeline:
    the layers once (each accumulated micro batch frees its activations in its backward)."""
    if schedule == "gpipe":
        return micro_batches * layers / pp
    if virtual > 1:
        chunks = min((virtual - 1) * pp + 2 * (pp - 1 - rank) + 1, micro_batches * virtual)
        return chunks * layers / (pp * virtual)
    return min(pp - rank, micro_batches) * layers / pp


def bubble_fraction(pp: int, virtual: int, micro_batches: int) -> float:
    """The share of a step each stage idles (Narayanan et al. 2021, section 2.2): the bubble lasts (pp - 1) micro-batch
    slots (fill and drain) against m of work, (pp - 1) / v of them with v interleaved chunks per rank, so
    (pp - 1) / (v m + pp - 1); (pp - 1) / (m + pp - 1) for 1F1B and GPipe."""
    return (pp - 1) / (virtual * micro_batches + pp - 1)


def activation_bytes_per_layer(shape: Shape, seq: int, micro: int, tp: int, sp: bool, recompute: str,
                               element_bytes: int = 2, dropout: bool | None = None, attention: str = "eager") -> float:
    """Korthikanti et al. 2022, Table 2, for one layer and micro batch: with 16-bit activations (`element_bytes` 2)
    and 1-byte dropout masks it is the paper's s b h (34 + 5 a s / h) and its TP / SP / recompute variants. Written
    out by what is kept: (4 e + 2 m) s b h replicated over the TP ranks (two norms' inputs and outputs, two dropout
    masks), 12 e s b h split (Q, K, V, the projection's input, the MLP's 4h input and output), (e + m + e m) a s^2 b
    split (softmax output, its dropout mask and output); e = element bytes, m = 1 with dropout. `element_bytes=4,
    dropout=False` is megahf in fp32 on CPU, which the tests measure. `attention="sdpa"`: the fused kernel's count
    instead of the [s, s] tensors (module docstring): 2 e s b h split (its output, the query copy) and 4 a s b
    (log-sum-exp) without selective recompute, 2 e s b h with it."""
    e, m = element_bytes, int(shape.dropout if dropout is None else dropout)
    s, b, h, a, t = seq, micro, shape.hidden, shape.heads, tp
    sbh = s * b * h
    if recompute == "full":
        return e * sbh / (t if sp else 1)
    if attention == "sdpa":
        core = 2 * e + (0.0 if recompute == "selective" else 4 * a / h)
    else:
        core = 0.0 if recompute == "selective" else (e + m + e * m) * a * s / h
    replicated, split = 4 * e + 2 * m, 12 * e + core
    if sp:
        return sbh * (replicated + split) / t
    return sbh * (replicated + split / t)


def loss_bytes(shape: Shape, layout: Layout, seq: int, loss_chunk_size: int) -> float:
    """The output layer's and the loss's bytes per GPU (see the module docstring)."""
    tokens, vocab = seq * layout.micro_batch, shape.padded_vocab / layout.tp
    if loss_chunk_size:
        return min(loss_chunk_size, tokens) * vocab * 6 + vocab * shape.hidden * 12
    return tokens * vocab * 12


def memory_breakdown(shape: Shape, layout: Layout, seq: int, loss_chunk_size: int = 1024,
                     attention: str = "eager", rank: int = 0) -> dict[str, float]:
    """Bytes per GPU of pipeline rank `rank`, by kind (see the module docstring); without a pipeline, rank 0 holds
    the whole model."""
    params = shape.parameters_per_gpu(layout.tp, layout.fsdp, layout.pp, rank)
    layers = in_flight_layers(shape.layers, layout.pp, layout.virtual, layout.schedule, layout.accumulation, rank)
    acts = layers * activation_bytes_per_layer(shape, seq, layout.micro_batch, layout.tp, layout.sequence_parallel,
                                               layout.recompute, attention=attention)
    return {
        "weights": 4 * params,
        "gradients": 4 * params,
        "optimizer": 8 * params,
        "activations": acts,
        "logits": loss_bytes(shape, layout, seq, loss_chunk_size) if rank == layout.pp - 1 else 0.0,
        "overhead": OVERHEAD_GB * GB,
    }


def stage_memory(shape: Shape, layout: Layout, seq: int, loss_chunk_size: int = 1024,
                 attention: str = "eager") -> dict[int, dict[str, float]]:
    """The breakdown of the first and the last pipeline rank (one rank without a pipeline): the only candidates for
    the largest, since a middle rank holds the same layers as they do, no embedding, no output layer, and fewer
    micro-batches in flight than the first."""
    return {rank: memory_breakdown(shape, layout, seq, loss_chunk_size, attention, rank)
            for rank in sorted({0, layout.pp - 1})}


def largest_stage_why(shape: Shape, layout: Layout, stages: dict[int, dict[str, float]]) -> tuple[int, str]:
    """The pipeline rank with the most bytes, and why in one sentence ("" without a pipeline)."""
    if layout.pp == 1:
        return 0, ""
    last, p, m = layout.pp - 1, layout.pp, layout.accumulation
    total = {rank: sum(memory.values()) / GB for rank, memory in stages.items()}
    first_acts, last_acts = stages[0]["activations"] / GB, stages[last]["activations"] / GB
    in_flight = in_flight_layers(shape.layers, p, layout.virtual, layout.schedule, m, 0)
    layers = shape.layers // p
    if layout.schedule == "gpipe":
        detail = f"GPipe: all {m} micro-batches x {layers} layers"
    elif layout.virtual > 1:
        chunk = shape.layers // (p * layout.virtual)
        detail = (f"interleaved 1F1B: {in_flight / chunk:g} chunk forwards x {chunk} layers, "
                  f"(1 + (p - 1) / (p v)) x num_layers")
    else:
        detail = f"1F1B: {min(p, m)} micro-batches x {layers} layers"
    acts = (f"the activations of {in_flight:g} layer forwards awaiting their backward ({detail}), {first_acts:.1f} GB "
            f"against the last stage's {last_acts:.1f} GB")
    if total[0] >= total[last]:
        return 0, (f"stage 0 of {p} is the largest ({total[0]:.1f} GB, the last {total[last]:.1f} GB): the word "
                   f"embedding, and {acts}")
    output = "a copy of the tied word embedding" if shape.tied else "the output layer"
    return last, (f"stage {last} of {p} is the largest ({total[last]:.1f} GB, the first {total[0]:.1f} GB): {output}, "
                  f"the final norm and the loss's logits ({stages[last]['logits'] / GB:.1f} GB) outweigh the first "
                  f"stage's word embedding and {acts}")


def model_flops_per_step(shape: Shape, seq: int, global_batch: int) -> float:
    """6 x N_matmul + 12 x layers x hidden x seq per token (`training.flops`), times the tokens of a step."""
    h = shape.hidden
    qkv = h * (shape.heads + 2 * shape.query_groups) * shape.head_dim
    mlp = (3 if shape.swiglu else 2) * h * shape.ffn
    matmul = shape.layers * (qkv + shape.heads * shape.head_dim * h + mlp) + shape.padded_vocab * h
    return (6.0 * matmul + 12.0 * shape.layers * h * seq) * seq * global_batch


def _allreduce_s(nbytes: float, group: int, bandwidth: float) -> float:
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / (bandwidth * GB)


def step_time(shape: Shape, layout: Layout, seq: int, global_batch: int, gpu: Gpu, gpus: int,
              gpus_per_node: int) -> dict[str, float]:
    """Seconds per optimizer step, by part (see the module docstring)."""
    flops = model_flops_per_step(shape, seq, global_batch)
    head = shape.padded_vocab * shape.hidden * 6 * seq * global_batch  # the output layer, on the last stage
    layer_forward = (flops - head) / 3
    extra = {"none": 0.0, "selective": 4.0 * shape.layers * shape.hidden * seq * seq * global_batch,
             "full": layer_forward}[layout.recompute]
    # the slowest stage paces the pipeline: the last, its layers and the output layer (all of it without a pipeline)
    stage_flops = (flops - head + extra) / layout.pp + head
    compute = stage_flops / (gpus // layout.pp * gpu.peak_tflops * 1e12 * gpu.efficiency)
    micro_batches = layout.accumulation
    tp_bytes = seq * layout.micro_batch * shape.hidden * 2  # bf16 activations
    per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp = micro_batches * shape.layers // layout.pp * per_layer * _allreduce_s(tp_bytes, layout.tp, gpu.nvlink_gbps)

    def bandwidth(group: int) -> float:
        """A data-parallel group of `group` ranks spans group x TP GPUs (TP innermost): NVLink within a node."""
        if group * layout.tp <= gpus_per_node:
            return gpu.nvlink_gbps
        return min(gpu.nvlink_gbps, gpu.network_gbps * gpus_per_node)

    params = max(shape.parameters_per_gpu(layout.tp, 1, layout.pp, rank) for rank in {0, layout.pp - 1})  # fp32
    fsdp = 0.0
    if layout.fsdp > 1:
        fsdp = micro_batches * 3 * (layout.fsdp - 1) / layout.fsdp * 4 * params / (bandwidth(layout.fsdp) * GB)
    pipeline = bubble = 0.0
    if layout.pp > 1:
        # each chunk sends its output forward and its input's gradient back, bf16, per micro batch (every TP rank its
        # own copy, in parallel); PP is the outermost dimension: across nodes as soon as there are several
        link = gpu.network_gbps if gpus > gpus_per_node else gpu.nvlink_gbps
        pipeline = 2 * layout.virtual * micro_batches * tp_bytes / (link * GB)
        busy = compute + tp + fsdp + pipeline
        bubble = busy * (layout.pp - 1) / (layout.virtual * micro_batches)  # (p - 1) / v slots of m: idle
    allreduce = _allreduce_s(4 * params / layout.fsdp, layout.dp // layout.fsdp, bandwidth(layout.dp))
    last_backward = compute * 2 / 3 / micro_batches
    dp = max(0.0, allreduce - last_backward)
    return {"compute": compute, "tensor_parallel": tp, "fsdp": fsdp, "pipeline": pipeline, "bubble": bubble,
            "data_parallel": dp, "total": compute + tp + fsdp + pipeline + bubble + dp}


@dataclass
class Candidate:
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float]
    fits: bool
    why_not: str = ""
    stage: int = 0  # the pipeline rank whose memory this is: the largest
    stage_why: str = ""  # which stage is the largest and why ("" without a pipeline)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(config, gpus: int, gpu_memory_gb: float, seq: int, global_batch: int, gpu: str = "h100",
         nodes: int = 0, loss_chunk_size: int = 1024, attention: str = "sdpa", pipeline: str = "") -> dict:
    """Every layout, fitting or not, ranked; see the module docstring. `config`: a MegatronGPT/Bert config;
    `attention`: "sdpa" (megahf's) or "eager" (the paper's count); `pipeline`: why the run cannot be pipelined
    (e.g. its recipe compiles the model), "" when it can."""
    if gpu not in GPUS:
        raise PlanError(f"--gpu={gpu!r} is not known; use one of {', '.join(GPUS)}")
    if attention not in ATTENTIONS:
        raise PlanError(f"--attention={attention!r} is not known; use one of {', '.join(ATTENTIONS)}")
    for flag, value in (("--gpus", gpus), ("--seq", seq), ("--global-batch", global_batch)):
        if value < 1:
            raise PlanError(f"{flag}={value} must be at least 1")
    if loss_chunk_size < 0:
        raise PlanError(f"--loss-chunk-size={loss_chunk_size} must be at least 0 (0: the plain loss)")
    if gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory={gpu_memory_gb}GB must be positive, e.g. 80GB")
    if not nodes:  # nodes of 8 GPUs, or one node of fewer
        if gpus > 8 and gpus % 8:
            raise PlanError(f"--gpus={gpus} does not fill nodes of 8 GPUs; give --nodes")
        nodes = max(1, gpus // 8)
    if gpus % nodes:
        raise PlanError(f"--gpus={gpus} is not a multiple of --nodes={nodes}; give the same number of GPUs per node")
    per_node = gpus // nodes
    device, shape = GPUS[gpu], Shape.of(config)
    if shape.learned_positions and seq > shape.max_positions:
        raise PlanError(f"--seq={seq} exceeds the model's max_position_embeddings={shape.max_positions}")
    if not any(global_batch % (gpus // tp) == 0 for tp in _divisors(gpus)):
        raise PlanError(f"--global-batch={global_batch} is not a multiple of any data-parallel size of {gpus} GPUs; "
                        f"use a multiple of {gpus}")
    pipeline = pipeline or ("megahf pipelines GPT models only (BERT's heads read the first and the masked tokens)"
                            if "bert" in getattr(config, "model_type", "") else "")
    candidates, ruled_out_tp, tps = [], {}, []
    for tp in _divisors(gpus):
        if tp > per_node:
            ruled_out_tp[tp] = f"TP {tp} would span nodes ({per_node} GPUs per node): its all-reduces, 4 per layer, " \
                               "would cross the network"
            continue
        try:
            config.check_tensor_parallel(tp)
        except ValueError as error:
            ruled_out_tp[tp] = f"TP {tp} does not divide the model: {error}"
            continue
        if global_batch % (gpus // tp):
            ruled_out_tp[tp] = (f"TP {tp}: the global batch {global_batch} does not divide over {gpus // tp} "
                                "data-parallel ranks")
        tps.append(tp)

    def add(tp: int, pp: int = 1, virtual: int = 1, schedule: str = "1f1b") -> None:
        """Every layout of these TP and PP degrees."""
        dp = gpus // (tp * pp)
        if global_batch % dp:
            return
        for fsdp in _divisors(dp):
            for sp in ((False, True) if tp > 1 else (False,)):
                for recompute in RECOMPUTE:
                    for micro in _divisors(global_batch // dp):
                        micro_batches = global_batch // (micro * dp)
                        if pp > 1 and (micro_batches < pp or (virtual > 1 and micro_batches % pp)):
                            continue  # refused by the layout: fewer micro-batches than stages, or partial rounds
                        layout = Layout(tp, fsdp, dp, sp, recompute, micro, micro_batches, pp, virtual, schedule)
                        candidates.append(_candidate(shape, layout, seq, global_batch, loss_chunk_size, attention,
                                                     gpu_memory_gb, device, gpus, per_node))

    for tp in tps:
        add(tp)
    within = [c for c in candidates if c.fits and c.layout.tp * c.layout.fsdp <= per_node]
    ruled_out_pp: dict[int, str] = {}
    if pipeline:
        pipeline = f"not considered: {pipeline}"
    elif within:
        best = min(within, key=_rank_key).layout
        pipeline = (f"not needed: {best.describe()} fits with its TP x FSDP groups ({best.tp * best.fsdp} GPUs) "
                    f"within a node of {per_node} (Megatron's advice: tensor parallelism within a node first, "
                    "pipeline stages only where the model does not fit so)")
    else:
        # Megatron's advice (Narayanan et al. 2021, section 3.3): tensor parallelism up to the GPUs of a node, then
        # pipeline stages across nodes; the bubble (and the tie-break) keep the stages as few as the model needs
        tp = max(tps, default=1)
        pipeline = (f"considered at TP {tp}, the most within a node of {per_node} GPUs that the model takes: no layout "
                    "fits with its TP x FSDP groups within a node; pipeline stages split the layers instead of "
                    "sharding them across nodes")
        for pp in _divisors(gpus)[1:]:
            if shape.layers % pp:
                ruled_out_pp[pp] = f"PP {pp} does not divide the {shape.layers} layers"
                continue
            if (gpus // tp) % pp:
                ruled_out_pp[pp] = f"PP {pp} x TP {tp} does not divide the {gpus} GPUs"
                continue
            before = len(candidates)
            add(tp, pp)
            for virtual in _divisors(shape.layers // pp)[1:]:
                add(tp, pp, virtual, "interleaved-1f1b")
            if len(candidates) == before:
                ruled_out_pp[pp] = (f"PP {pp}: the global batch {global_batch} gives fewer micro-batches than its "
                                    f"{pp} stages (or not a multiple of the data-parallel size {gpus // (tp * pp)})")
    fitting = sorted((c for c in candidates if c.fits), key=_rank_key)
    return {"shape": shape, "gpu": device, "gpus": gpus, "nodes": nodes, "gpus_per_node": per_node,
            "gpu_memory_gb": gpu_memory_gb, "seq": seq, "global_batch": global_batch,
            "loss_chunk_size": loss_chunk_size, "attention": attention,
            "model_flops_per_step": model_flops_per_step(shape, seq, global_batch),
            "fitting": fitting, "not_fitting": [c for c in candidates if not c.fits], "ruled_out_tp": ruled_out_tp,
            "pipeline": pipeline, "ruled_out_pp": ruled_out_pp}


def _candidate(shape: Shape, layout: Layout, seq: int, global_batch: int, loss_chunk_size: int, attention: str,
               gpu_memory_gb: float, device: Gpu, gpus: int, per_node: int) -> Candidate:
    """One layout's memory (of its largest pipeline stage), step time and fit."""
    stages = stage_memory(shape, layout, seq, loss_chunk_size, attention)
    stage, stage_why = largest_stage_why(shape, layout, stages)
    memory = stages[stage]
    fits = sum(memory.values()) <= gpu_memory_gb * GB
    why = "" if fits else _why_not(memory, gpu_memory_gb) + (f" on stage {stage}" if layout.pp > 1 else "")
    return Candidate(layout, memory, step_time(shape, layout, seq, global_batch, device, gpus, per_node), fits, why,
                     stage, stage_why)


def _rank_key(c: Candidate):
    lay = c.layout
    # equal predicted times (to 4 significant digits), then the simpler layout: fewer pipeline stages and chunks, no
    # FSDP (its time is a bound), less TP, less recompute, no SP, the larger micro batch
    return (float(f"{c.time['total']:.4g}"), lay.pp, lay.virtual, lay.fsdp, lay.tp, RECOMPUTE.index(lay.recompute),
            lay.sequence_parallel, -lay.micro_batch)


def _why_not(memory: dict[str, float], gpu_memory_gb: float) -> str:
    total = sum(memory.values())
    biggest = max(memory, key=memory.get)
    return (f"needs {total / GB:.1f} GB > {gpu_memory_gb:g} GB (largest: {biggest} {memory[biggest] / GB:.1f} GB)")


def best_per_tp(result: dict) -> dict[int, Candidate]:
    """The best fitting layout of each TP degree."""
    best: dict[int, Candidate] = {}
    for c in result["fitting"]:
        best.setdefault(c.layout.tp, c)
    return best


def why_not_tp(result: dict, tp: int) -> str:
    """Why no layout of this TP degree is the first: it does not fit, or it is slower than the best."""
    if tp in result["ruled_out_tp"]:
        return result["ruled_out_tp"][tp]
    best = best_per_tp(result)
    if tp not in best:
        smallest = min((c for c in result["not_fitting"] if c.layout.tp == tp), key=lambda c: c.memory_total)
        return f"TP {tp}: no layout fits; the smallest ({smallest.layout.describe()}) {smallest.why_not}"
    first, this = result["fitting"][0], best[tp]
    if this is first:
        return f"TP {tp}: the best layout"
    unsharded = ""
    if not any(c.layout.tp == tp and c.layout.fsdp == 1 and c.layout.pp == 1 for c in result["fitting"]):
        smallest = min((c for c in result["not_fitting"] if c.layout.tp == tp and c.layout.fsdp == 1
                        and c.layout.pp == 1),
                       key=lambda c: c.memory_total)
        unsharded = f"; without FSDP nothing fits ({smallest.why_not})"
    return (f"TP {tp}: fits ({this.layout.describe()}), but {this.time['total']:.3f} s per step vs "
            f"{first.time['total']:.3f} s ({_slower_because(this, first)}){unsharded}")


def _slower_because(this: Candidate, first: Candidate) -> str:
    diffs = {k: this.time[k] - first.time[k]
             for k in ("compute", "tensor_parallel", "fsdp", "pipeline", "bubble", "data_parallel")}
    part = max(diffs, key=diffs.get)
    if diffs[part] <= 0:
        return "equal time: the simpler layout ranks first"
    return f"+{diffs[part]:.3f} s of {part.replace('_', ' ').replace('pipeline', 'pipeline sends')}"


def why_not_pp(result: dict, pp: int) -> str:
    """Why no layout of this pipeline degree is the first (as `why_not_tp`)."""
    if pp in result["ruled_out_pp"]:
        return result["ruled_out_pp"][pp]
    mine = [c for c in result["fitting"] if c.layout.pp == pp]
    if not mine:
        smallest = min((c for c in result["not_fitting"] if c.layout.pp == pp), key=lambda c: c.memory_total)
        return f"PP {pp}: no layout fits; the smallest ({smallest.layout.describe()}) {smallest.why_not}"
    first, this = result["fitting"][0], mine[0]
    if this is first:
        return f"PP {pp}: the best layout"
    return (f"PP {pp}: fits ({this.layout.describe()}), but {this.time['total']:.3f} s per step vs "
            f"{first.time['total']:.3f} s ({_slower_because(this, first)})")


# ---------------------------------------------------------------------- the verb


def parse_memory(text: str) -> float:
    """'80GB', '80', '32 GiB' -> GB (GiB converted)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise PlanError(f"--gpu-memory={text!r} is not a size; write e.g. 80GB")
    value = float(match.group(1))
    return value * (1.073741824 if (match.group(2) or "").lower() == "gib" else 1.0)


def load_model_config(model: str):
    """A preset name, a recipe YAML (its model and model_overrides) or a config.json."""
    from .recipe import ModelRecipe, RecipeError
    from .training.setup import build_config, config_class_of

    path = Path(model)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        import yaml

        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        recipe = ModelRecipe(model=values.get("model", "gpt-tiny"), model_overrides=values.get("model_overrides") or {})
    elif path.suffix == ".json" and path.is_file():
        values = json.loads(path.read_text(encoding="utf-8"))
        base = ModelRecipe(model="bert-tiny" if "bert" in values.get("model_type", "") else "gpt-tiny")
        fields = {f.name for f in dataclasses.fields(config_class_of(base))}
        return config_class_of(base)(**{k: v for k, v in values.items() if k in fields})
    else:
        recipe = ModelRecipe(model=model)
    try:
        recipe.validate()
        return build_config(recipe)
    except RecipeError as error:
        raise PlanError(f"--model={model!r}: {error}") from None


def format_plan(result: dict, model: str, top: int = 10) -> str:
    shape, lines = result["shape"], []
    split, whole = shape.parameters()
    n = split + whole
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    lines.append(f"{model}: {size} parameters, {shape.layers} layers, hidden {shape.hidden}, "
                 f"{shape.heads} heads, vocab {shape.padded_vocab} (padded); {result['gpus']} x {result['gpu'].name} "
                 f"{result['gpu_memory_gb']:g} GB on {result['nodes']} node(s) of {result['gpus_per_node']}; seq "
                 f"{result['seq']}, global batch {result['global_batch']}, "
                 + (f"loss chunk {result['loss_chunk_size']}" if result["loss_chunk_size"] else "plain loss")
                 + f", {result['attention']} attention")
    lines.append(f"model FLOPs per step: {result['model_flops_per_step']:.3e}")
    fitting = result["fitting"]
    lines.append(f"{len(fitting)} layouts fit, {len(result['not_fitting'])} do not; the {min(top, len(fitting))} "
                 "fastest (memory per GPU in GB: weights + gradients + optimizer + activations + logits + overhead):")
    for i, c in enumerate(fitting[:top], 1):
        m, t = {k: v / GB for k, v in c.memory.items()}, c.time
        pipelined = f", PP {t['pipeline']:.3f}, bubble {t['bubble']:.3f}" if c.layout.pp > 1 else ""
        lines.append(f"{i:3d}. {c.layout.describe():55s} {t['total']:8.3f} s/step (compute {t['compute']:.3f}, TP "
                     f"{t['tensor_parallel']:.3f}, FSDP {t['fsdp']:.3f}{pipelined}, DP {t['data_parallel']:.3f})")
        lines.append(f"     {c.memory_total / GB:6.1f} GB = {m['weights']:.1f} + {m['gradients']:.1f} + "
                     f"{m['optimizer']:.1f} + {m['activations']:.1f} + {m['logits']:.1f} + {m['overhead']:.1f}"
                     + (f" on stage {c.stage} of {c.layout.pp}, the largest" if c.layout.pp > 1 else ""))
        if c.layout.pp > 1:
            lay = c.layout
            bubble = bubble_fraction(lay.pp, lay.virtual, lay.accumulation)
            v = f"{lay.virtual} x " if lay.virtual > 1 else ""
            lines.append(f"     bubble (p - 1) / ({v}m + p - 1) = {lay.pp - 1} / ({v}{lay.accumulation} + "
                         f"{lay.pp - 1}) = {bubble:.1%} of the step; {c.stage_why}")
    lines.append("each tensor-parallel degree:")
    tps = sorted({c.layout.tp for c in fitting + result["not_fitting"]} | set(result["ruled_out_tp"]))
    lines.extend(f"  {why_not_tp(result, tp)}" for tp in tps)
    lines.append(f"pipeline parallelism: {result['pipeline']}")
    pps = sorted({c.layout.pp for c in fitting + result["not_fitting"]} | set(result["ruled_out_pp"]))
    pps = pps if len(pps) > 1 else []  # PP 1 only against pipelines
    lines.extend(f"  {why_not_pp(result, pp)}" for pp in pps)
    if not fitting:
        lines.append("nothing fits: more GPUs, more memory per GPU, or a smaller model / sequence")
    return "\n".join(lines)


def write_layout(result: dict, out: str | os.PathLike, model: str) -> tuple[Path, Path]:
    """The first layout as a recipe (the `--model` recipe, or the defaults with `model: PRESET`, with the layout keys
    set) and an accelerate launch config, to run as written:

        accelerate launch --config_file OUT/launch.yaml -m megahf pretrain OUT/recipe.yaml

    `sequence_parallel`, `recompute` and the pipeline keys are written only when the layout uses them (and removed
    from the `--model` recipe when it does not)."""
    import yaml

    from .atomic import atomic_write_text

    if not result["fitting"]:
        raise PlanError("no layout fits: nothing to write")
    lay = result["fitting"][0].layout
    path = Path(model)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    elif path.suffix == ".json":
        raise PlanError(f"--write needs --model as a preset or a recipe YAML, not {model!r}")
    else:
        values = {"model": model}
    # `recompute` replaces main's activation_checkpointing (refused once megahf's scale work is merged): never both
    values.pop("activation_checkpointing", None)
    values.update({"tensor_parallel_size": lay.tp, "fsdp_size": lay.fsdp, "data_parallel_size": 0,
                   "micro_batch_size": lay.micro_batch, "gradient_accumulation_steps": 0,
                   "global_batch_size": result["global_batch"], "seq_length": result["seq"]})
    for key in ("sequence_parallel", "recompute", "pipeline_parallel_size", "virtual_pipeline_size",
                "pipeline_schedule"):
        values.pop(key, None)  # the layout's, not the --model recipe's
    if lay.sequence_parallel:
        values["sequence_parallel"] = True
    if lay.recompute != "none":
        values["recompute"] = lay.recompute
    if lay.pp > 1:
        values.update({"pipeline_parallel_size": lay.pp, "pipeline_schedule": lay.schedule})
        if lay.virtual > 1:
            values["virtual_pipeline_size"] = lay.virtual
    if result["loss_chunk_size"] != 1024:  # the recipes' default
        values["loss_chunk_size"] = result["loss_chunk_size"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by `megahf plan` ({lay.describe()}; {result['fitting'][0].time['total']:.3f} s/step "
              f"predicted, {result['fitting'][0].memory_total / GB:.1f} GB per GPU):\n"
              "#   accelerate launch --config_file launch.yaml -m megahf pretrain recipe.yaml\n")
    atomic_write_text(out / "recipe.yaml", header + yaml.safe_dump(values, sort_keys=False))
    launch = "\n".join([
        f"# Written by `megahf plan`: {result['gpus']} processes on {result['nodes']} node(s); the layout is the "
        "recipe's (tensor_parallel_size, fsdp_size" + (", pipeline_parallel_size" if lay.pp > 1 else "") + ").",
        "compute_environment: LOCAL_MACHINE", "distributed_type: MULTI_GPU",
        f"num_machines: {result['nodes']}", f"num_processes: {result['gpus']}", "machine_rank: 0",
        "mixed_precision: bf16", "use_cpu: false", "rdzv_backend: static", "same_network: true"]) + "\n"
    atomic_write_text(out / "launch.yaml", launch)
    return out / "recipe.yaml", out / "launch.yaml"


def recipe_sizes(model: str) -> dict:
    """The seq_length and global_batch_size a recipe YAML given as --model sets ({} for a preset or config.json)."""
    path = Path(model)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return {}
    import yaml

    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {key: values[key] for key in ("seq_length", "global_batch_size") if values.get(key)}


def recipe_refuses_pipeline(model: str) -> str:
    """Why a recipe YAML given as --model cannot be pipelined ("" when it can, or for a preset or config.json):
    megahf does not compile a pipelined model (training/setup.py check_pipeline)."""
    path = Path(model)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return ""
    import yaml

    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return "the recipe sets compile: true, which megahf does not pipeline" if values.get("compile") else ""


def run(args) -> int:
    """`megahf plan` (cli.py parses the flags). --seq and --global-batch default to the --model recipe's
    seq_length and global_batch_size, else 1024 and 512."""
    config = load_model_config(args.model)
    sizes = recipe_sizes(args.model)
    seq = args.seq if args.seq is not None else sizes.get("seq_length", 1024)
    global_batch = args.global_batch if args.global_batch is not None else sizes.get("global_batch_size", 512)
    result = plan(config, gpus=args.gpus, gpu_memory_gb=parse_memory(args.gpu_memory), seq=seq,
                  global_batch=global_batch, gpu=args.gpu, nodes=args.nodes,
                  loss_chunk_size=args.loss_chunk_size, attention=args.attention,
                  pipeline=recipe_refuses_pipeline(args.model))
    print(format_plan(result, args.model, top=args.top))
    if args.write:
        recipe, launch = write_layout(result, args.write, args.model)
        print(f"wrote {recipe} (recipe keys) and {launch} (accelerate launch config)")
    return 0


__all__ = ["ATTENTIONS", "GPUS", "Candidate", "Gpu", "Layout", "PlanError", "Shape", "activation_bytes_per_layer",
           "best_per_tp", "bubble_fraction", "format_plan", "in_flight_layers", "largest_stage_why",
           "load_model_config", "loss_bytes", "memory_breakdown", "model_flops_per_step", "plan",
           "recipe_refuses_pipeline", "recipe_sizes", "stage_memory", "step_time", "why_not_pp", "why_not_tp",
           "write_layout"]
