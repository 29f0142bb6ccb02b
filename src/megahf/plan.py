"""`megahf plan`: every parallel layout of a model on N GPUs, which fit in memory, ranked by predicted step time.

    megahf plan --model gpt-8.3b --gpus 512 --gpu v100 --gpu-memory 32GB --nodes 32 --seq 1024 --global-batch 512

A layout is tensor parallel t (within a node), FSDP f (shards weights, gradients and optimizer state over f of the
data-parallel ranks), data parallel d = N / t, sequence parallel (t >= 2), recompute (none | selective | full) and
the micro batch b (global batch = b x d x accumulation).

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
Constants per GPU (`GPUS`): dense bf16/fp16 peak (data sheets), efficiency (what Megatron reached: one V100 30% of
peak in Shoeybi et al. 2019; 44-52% on A100 in Narayanan et al. 2021; 41-48% on H100 for Megatron-Core), NVLink
bus bandwidth per GPU, and the network per GPU of the systems those papers used (DGX-2H: 8 x 100 Gb/s for 16 V100;
DGX A100: 200 Gb/s per GPU; DGX H100/H200: 400 Gb/s per GPU).

Among layouts of equal predicted time (to 4 digits), the one with less FSDP, less tensor parallelism, less recompute
and the larger micro batch ranks first (fewer moving parts).
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

    def parameters(self, tp: int = 1) -> tuple[int, int]:
        """(parameters split over the TP ranks, held whole by every rank), summed over the model."""
        h, qkv_out = self.hidden, (self.heads + 2 * self.query_groups) * self.head_dim
        fc1_out = self.ffn * (2 if self.swiglu else 1)
        split = h * qkv_out + self.heads * self.head_dim * h + h * fc1_out + self.ffn * h  # column and row weights
        whole = 2 * h * (2 if self.layernorm_bias else 1)  # two norms
        if self.bias:
            split += qkv_out + fc1_out  # column-parallel biases are split
            whole += 2 * h  # row-parallel biases are added after the reduction: whole
        split *= self.layers
        whole *= self.layers
        split += self.padded_vocab * h * (1 if self.tied else 2)
        whole += h * (2 if self.layernorm_bias else 1) + (self.max_positions * h if self.learned_positions else 0)
        return split, whole

    def parameters_per_gpu(self, tp: int, fsdp: int) -> float:
        split, whole = self.parameters()
        return (split / tp + whole) / fsdp


@dataclass(frozen=True)
class Layout:
    tp: int
    fsdp: int
    dp: int
    sequence_parallel: bool
    recompute: str
    micro_batch: int
    accumulation: int

    def describe(self) -> str:
        parts = [f"TP {self.tp}", f"DP {self.dp}"]
        if self.fsdp > 1:
            parts.append(f"FSDP {self.fsdp}")
        if self.sequence_parallel:
            parts.append("SP")
        parts.append(f"recompute {self.recompute}")
        parts.append(f"micro {self.micro_batch} x acc {self.accumulation}")
        return ", ".join(parts)


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
                     attention: str = "eager") -> dict[str, float]:
    """Bytes per GPU, by kind (see the module docstring)."""
    params = shape.parameters_per_gpu(layout.tp, layout.fsdp)
    acts = shape.layers * activation_bytes_per_layer(shape, seq, layout.micro_batch, layout.tp,
                                                     layout.sequence_parallel, layout.recompute, attention=attention)
    return {
        "weights": 4 * params,
        "gradients": 4 * params,
        "optimizer": 8 * params,
        "activations": acts,
        "logits": loss_bytes(shape, layout, seq, loss_chunk_size),
        "overhead": OVERHEAD_GB * GB,
    }


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
    layer_forward = flops / 3 * (1 - shape.padded_vocab * shape.hidden * 6 * seq * global_batch / flops)
    extra = {"none": 0.0, "selective": 4.0 * shape.layers * shape.hidden * seq * seq * global_batch,
             "full": layer_forward}[layout.recompute]
    compute = (flops + extra) / (gpus * gpu.peak_tflops * 1e12 * gpu.efficiency)
    micro_batches = layout.accumulation
    tp_bytes = seq * layout.micro_batch * shape.hidden * 2  # bf16 activations
    per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp = micro_batches * shape.layers * per_layer * _allreduce_s(tp_bytes, layout.tp, gpu.nvlink_gbps)

    def bandwidth(group: int) -> float:
        """A data-parallel group of `group` ranks spans group x TP GPUs (TP innermost): NVLink within a node."""
        if group * layout.tp <= gpus_per_node:
            return gpu.nvlink_gbps
        return min(gpu.nvlink_gbps, gpu.network_gbps * gpus_per_node)

    params = shape.parameters_per_gpu(layout.tp, 1)  # fp32, before FSDP sharding
    fsdp = 0.0
    if layout.fsdp > 1:
        fsdp = micro_batches * 3 * (layout.fsdp - 1) / layout.fsdp * 4 * params / (bandwidth(layout.fsdp) * GB)
    allreduce = _allreduce_s(4 * params / layout.fsdp, layout.dp // layout.fsdp, bandwidth(layout.dp))
    last_backward = compute * 2 / 3 / micro_batches
    dp = max(0.0, allreduce - last_backward)
    return {"compute": compute, "tensor_parallel": tp, "fsdp": fsdp, "data_parallel": dp,
            "total": compute + tp + fsdp + dp}


@dataclass
class Candidate:
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float]
    fits: bool
    why_not: str = ""

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(config, gpus: int, gpu_memory_gb: float, seq: int, global_batch: int, gpu: str = "h100",
         nodes: int = 0, loss_chunk_size: int = 1024, attention: str = "sdpa") -> dict:
    """Every layout, fitting or not, ranked; see the module docstring. `config`: a MegatronGPT/Bert config;
    `attention`: "sdpa" (megahf's) or "eager" (the paper's count)."""
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
    candidates, ruled_out_tp = [], {}
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
        dp = gpus // tp
        if global_batch % dp:
            ruled_out_tp[tp] = f"TP {tp}: the global batch {global_batch} does not divide over {dp} data-parallel ranks"
            continue
        for fsdp in _divisors(dp):
            for sp in ((False, True) if tp > 1 else (False,)):
                for recompute in RECOMPUTE:
                    for micro in _divisors(global_batch):
                        if global_batch % (micro * dp):
                            continue
                        layout = Layout(tp, fsdp, dp, sp, recompute, micro, global_batch // (micro * dp))
                        memory = memory_breakdown(shape, layout, seq, loss_chunk_size, attention)
                        total = sum(memory.values())
                        fits = total <= gpu_memory_gb * GB
                        why = "" if fits else _why_not(memory, gpu_memory_gb)
                        candidates.append(Candidate(layout, memory, step_time(shape, layout, seq, global_batch,
                                                                              device, gpus, per_node), fits, why))
    fitting = sorted((c for c in candidates if c.fits), key=_rank_key)
    return {"shape": shape, "gpu": device, "gpus": gpus, "nodes": nodes, "gpus_per_node": per_node,
            "gpu_memory_gb": gpu_memory_gb, "seq": seq, "global_batch": global_batch,
            "loss_chunk_size": loss_chunk_size, "attention": attention,
            "model_flops_per_step": model_flops_per_step(shape, seq, global_batch),
            "fitting": fitting, "not_fitting": [c for c in candidates if not c.fits], "ruled_out_tp": ruled_out_tp,
            }


def _rank_key(c: Candidate):
    lay = c.layout
    # equal predicted times (to 4 significant digits), then the simpler layout: no FSDP (its time is a bound), less
    # TP, less recompute, no SP, the larger micro batch
    return (float(f"{c.time['total']:.4g}"), lay.fsdp, lay.tp, RECOMPUTE.index(lay.recompute), lay.sequence_parallel,
            -lay.micro_batch)


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
    if not any(c.layout.tp == tp and c.layout.fsdp == 1 for c in result["fitting"]):
        smallest = min((c for c in result["not_fitting"] if c.layout.tp == tp and c.layout.fsdp == 1),
                       key=lambda c: c.memory_total)
        unsharded = f"; without FSDP nothing fits ({smallest.why_not})"
    return (f"TP {tp}: fits ({this.layout.describe()}), but {this.time['total']:.3f} s per step vs "
            f"{first.time['total']:.3f} s ({_slower_because(this, first)}){unsharded}")


def _slower_because(this: Candidate, first: Candidate) -> str:
    diffs = {k: this.time[k] - first.time[k] for k in ("compute", "tensor_parallel", "fsdp", "data_parallel")}
    part = max(diffs, key=diffs.get)
    if diffs[part] <= 0:
        return "equal time: the simpler layout ranks first"
    return f"+{diffs[part]:.3f} s of {part.replace('_', ' ')}"


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
        lines.append(f"{i:3d}. {c.layout.describe():55s} {t['total']:8.3f} s/step (compute {t['compute']:.3f}, TP "
                     f"{t['tensor_parallel']:.3f}, FSDP {t['fsdp']:.3f}, DP {t['data_parallel']:.3f})")
        lines.append(f"     {c.memory_total / GB:6.1f} GB = {m['weights']:.1f} + {m['gradients']:.1f} + "
                     f"{m['optimizer']:.1f} + {m['activations']:.1f} + {m['logits']:.1f} + {m['overhead']:.1f}")
    lines.append("each tensor-parallel degree:")
    tps = sorted({c.layout.tp for c in fitting + result["not_fitting"]} | set(result["ruled_out_tp"]))
    lines.extend(f"  {why_not_tp(result, tp)}" for tp in tps)
    if not fitting:
        lines.append("nothing fits: more GPUs, more memory per GPU, or a smaller model / sequence")
    return "\n".join(lines)


def write_layout(result: dict, out: str | os.PathLike, model: str) -> tuple[Path, Path]:
    """The first layout as a recipe (the `--model` recipe, or the defaults with `model: PRESET`, with the layout keys
    set) and an accelerate launch config, to run as written:

        accelerate launch --config_file OUT/launch.yaml -m megahf pretrain OUT/recipe.yaml

    `sequence_parallel` and `recompute` (recipe keys of megahf's scale work) are written only when the layout uses
    them."""
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
    if lay.sequence_parallel:
        values["sequence_parallel"] = True
    if lay.recompute != "none":
        values["recompute"] = lay.recompute
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
        "recipe's (tensor_parallel_size, fsdp_size).",
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


def run(args) -> int:
    """`megahf plan` (cli.py parses the flags). --seq and --global-batch default to the --model recipe's
    seq_length and global_batch_size, else 1024 and 512."""
    config = load_model_config(args.model)
    sizes = recipe_sizes(args.model)
    seq = args.seq if args.seq is not None else sizes.get("seq_length", 1024)
    global_batch = args.global_batch if args.global_batch is not None else sizes.get("global_batch_size", 512)
    result = plan(config, gpus=args.gpus, gpu_memory_gb=parse_memory(args.gpu_memory), seq=seq,
                  global_batch=global_batch, gpu=args.gpu, nodes=args.nodes,
                  loss_chunk_size=args.loss_chunk_size, attention=args.attention)
    print(format_plan(result, args.model, top=args.top))
    if args.write:
        recipe, launch = write_layout(result, args.write, args.model)
        print(f"wrote {recipe} (recipe keys) and {launch} (accelerate launch config)")
    return 0


__all__ = ["ATTENTIONS", "GPUS", "Candidate", "Gpu", "Layout", "PlanError", "Shape", "activation_bytes_per_layer",
           "best_per_tp", "format_plan", "load_model_config", "loss_bytes", "memory_breakdown", "model_flops_per_step",
           "plan", "recipe_sizes", "step_time", "why_not_tp", "write_layout"]
