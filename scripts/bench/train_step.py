#!/usr/bin/env python
"""Training-step throughput of megahf's models against transformers' reference models.

Pairs of models of the same shape, each pair built with the same attention implementation:

* GPT-2 style: MegatronGPTForCausalLM (learned positions, LayerNorm, exact GeLU, biases, tied embeddings)
  against transformers' GPT2LMHeadModel (activation_function="gelu", tied embeddings).
* Llama style: MegatronGPTForCausalLM from the `llama-tiny` preset (RoPE, RMSNorm, SwiGLU, grouped-query
  attention, no biases, untied output) against transformers' LlamaForCausalLM.
* BERT: MegatronBertForPreTraining (pre-LayerNorm, Megatron's order) against transformers'
  MegatronBertForPreTraining, and megahf's post-LayerNorm variant against transformers' BertForPreTraining (the
  original BERT order), all with masked-LM (15% of the tokens) + sentence-order labels.

One step is forward (with the model's own loss: causal LM, or masked LM + sentence order) + backward + AdamW step
(fused, as megahf pretrain and transformers' Trainer run it; `--adamw foreach`: torch's own default) + zero_grad, timed with
time.perf_counter on the same batch of random token ids. Steps of the models are interleaved (A, B, A, B, ...)
after warm-up so that drifts of the machine's speed hit every model alike. The report gives the median and the
interquartile range of tokens/s of every model, and the megahf/peer ratio (> 1: megahf is faster): the ratio of
the medians, and the median and quartiles of the per-round (paired) ratios, whose interquartile range decides the
verdict (faster / slower / within noise). On a CPU device the same is reported from the process's CPU time per step,
which other processes competing for the cores disturb much less than wall time; the 1-minute load average before
and after the run is printed to show whether that happened.

megahf pads the vocabulary to a multiple of `make_vocab_size_divisible_by` (128 by default: 50257 -> 50304),
the peers do not. By default the headline comparison sets it to 1 so that both models of a pair hold exactly the
same parameters; the padded megahf model is timed too and reported on an extra line (--no-padded-extra to skip).

Usage (from the repository root):

    python scripts/bench/train_step.py                       # every pair, fp32 on CPU, sdpa
    python scripts/bench/train_step.py --pair gpt --attn eager --threads 2 --json out.json
    python scripts/bench/train_step.py --pair bert --seq 128
    python scripts/bench/train_step.py --device cuda --dtype bf16 --hidden 1024 --layers 8 --heads 16 --seq 1024
    python scripts/bench/train_step.py --pair gpt --loss-chunk 1024 --compile   # the variants below as well

Variants (each an extra line against the same peer, vocabulary padded as megahf trains):

* `--loss-chunk N`: megahf with `loss_chunk_size=N`: the output layer and the loss chunk by chunk (BERT: the
  masked-LM head on the labeled positions only, then the same), the logits never held whole (the peak memory of
  that loss: scripts/bench/loss_memory.py).
* `--compile`: every transformer layer torch.compile'd (megahf's `compile: true`), megahf AND the peer, compared
  compiled against compiled; with `--loss-chunk` the compiled megahf model uses the chunked loss too. The first
  (warm-up) steps include the compilation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import transformers
from transformers import (
    BertConfig,
    BertForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MegatronBertForPreTraining,
)

from megahf import MegatronBertConfig, MegatronGPTConfig, MegatronGPTForCausalLM
from megahf import MegatronBertForPreTraining as MegahfBertForPreTraining
from megahf.training.compile import compile_layers

PAIRS = ("gpt", "llama", "bert", "bert-post-ln")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pair", choices=(*PAIRS, "all"), default="all",
                   help="which comparison to run: gpt, llama, bert (pre-LN, vs MegatronBert), bert-post-ln "
                        "(vs Bert), or all")
    shape = p.add_argument_group("shape (shared by both pairs unless noted)")
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--seq", type=int, default=256, help="sequence length (also max_position_embeddings)")
    shape.add_argument("--batch", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=50257, help="GPT and Llama vocabulary")
    shape.add_argument("--bert-vocab", type=int, default=30522, help="BERT vocabulary (uncased WordPiece)")
    shape.add_argument("--gpt-ffn", type=int, default=None, help="GPT-2 MLP width (default 4 * hidden)")
    shape.add_argument("--llama-ffn", type=int, default=None,
                       help="Llama MLP width (default: llama-tiny's ratio 352/128, i.e. 2.75 * hidden)")
    shape.add_argument("--kv-heads", type=int, default=None,
                       help="Llama key/value heads (default: llama-tiny's ratio, heads / 2)")
    shape.add_argument("--rope-theta", type=float, default=None, help="default: the llama-tiny preset's")
    shape.add_argument("--rms-eps", type=float, default=None, help="default: the llama-tiny preset's")
    vocab = p.add_argument_group("vocabulary padding")
    vocab.add_argument("--same-vocab", action=argparse.BooleanOptionalAction, default=True,
                       help="headline: megahf with make_vocab_size_divisible_by=1, i.e. exactly the peer's vocab "
                            "(default); --no-same-vocab compares the padded megahf model instead")
    vocab.add_argument("--padded-extra", action=argparse.BooleanOptionalAction, default=True,
                       help="also time megahf with its default padded vocabulary and report it on an extra line")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                     help="fp32, or bf16 autocast (fp32 weights and optimizer; meant for GPUs)")
    run.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation of all models")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per model, interleaved")
    run.add_argument("--reps", type=int, default=12, help="timed steps per model, interleaved")
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--adamw", choices=("fused", "foreach"), default="fused",
                     help="AdamW implementation of every model: fused (default; what megahf pretrain and transformers' "
                          "Trainer use on torch >= 2.8) or foreach (torch.optim.AdamW's own default)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", default=None, help="also write the JSON result to this path")
    variants = p.add_argument_group("variants (extra models in the same run)")
    variants.add_argument("--loss-chunk", type=int, default=0,
                          help="also time megahf with loss_chunk_size=N (every pair); 0: not (default)")
    variants.add_argument("--compile", action="store_true",
                          help="also time megahf and the peer with every layer torch.compile'd")
    args = p.parse_args(argv)
    if args.loss_chunk < 0:
        p.error("--loss-chunk must be >= 0")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models


def special_tokens(args) -> dict:
    """GPT-2's bos/eos id (50256) when it lies inside the vocabulary, else none (a smaller --vocab)."""
    return {} if args.vocab > 50256 else {"bos_token_id": None, "eos_token_id": None}


def megahf_gpt(args, divisible_by: int | None, loss_chunk: int = 0) -> MegatronGPTForCausalLM:
    overrides = dict(loss_chunk_size=loss_chunk,
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=args.heads,
        ffn_hidden_size=args.gpt_ffn or 4 * args.hidden, max_position_embeddings=args.seq,
        hidden_dropout=0.0, attention_dropout=0.0, activation="gelu", tie_word_embeddings=True, **special_tokens(args),
    )
    if divisible_by is not None:
        overrides["make_vocab_size_divisible_by"] = divisible_by
    config = MegatronGPTConfig.from_preset("gpt-tiny", **overrides)
    config._attn_implementation = args.attn
    return MegatronGPTForCausalLM(config)


def peer_gpt(args) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
        n_inner=args.gpt_ffn or 4 * args.hidden, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **special_tokens(args),
    )
    config._attn_implementation = args.attn
    return GPT2LMHeadModel(config)


def llama_shape(args) -> dict:
    """The llama-tiny preset scaled to --hidden/--heads: its ffn and kv-head ratios, its theta and epsilon."""
    tiny = MegatronGPTConfig.from_preset("llama-tiny")
    ffn = args.llama_ffn or int(round(args.hidden * tiny.ffn_hidden_size / tiny.hidden_size))
    kv = args.kv_heads or max(1, args.heads * tiny.num_query_groups // tiny.num_attention_heads)
    theta = args.rope_theta if args.rope_theta is not None else tiny.rotary_base
    eps = args.rms_eps if args.rms_eps is not None else tiny.layernorm_epsilon
    return {"ffn": ffn, "kv_heads": kv, "rope_theta": theta, "rms_eps": eps}


def megahf_llama(args, divisible_by: int | None, loss_chunk: int = 0) -> MegatronGPTForCausalLM:
    s = llama_shape(args)
    overrides = dict(loss_chunk_size=loss_chunk,
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=args.heads,
        num_query_groups=s["kv_heads"], ffn_hidden_size=s["ffn"], max_position_embeddings=args.seq,
        rotary_base=s["rope_theta"], layernorm_epsilon=s["rms_eps"], hidden_dropout=0.0, attention_dropout=0.0,
        **special_tokens(args),
    )
    if divisible_by is not None:
        overrides["make_vocab_size_divisible_by"] = divisible_by
    config = MegatronGPTConfig.from_preset("llama-tiny", **overrides)
    assert config.position_embedding_type == "rope" and config.normalization == "RMSNorm"
    assert config.activation == "swiglu" and not config.add_bias_linear and not config.tie_word_embeddings
    config._attn_implementation = args.attn
    return MegatronGPTForCausalLM(config)


def peer_llama(args) -> LlamaForCausalLM:
    s = llama_shape(args)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=s["ffn"], num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=s["kv_heads"], max_position_embeddings=args.seq,
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])}, rms_norm_eps=s["rms_eps"],
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0, hidden_act="silu",
    )
    config._attn_implementation = args.attn
    return LlamaForCausalLM(config)


def pair_attention(pair: str, args) -> str:
    """transformers' MegatronBert has eager attention only: its pair runs eager on both sides."""
    return "eager" if pair == "bert" else args.attn


def megahf_bert(args, divisible_by: int | None, order: str = "pre", attn: str | None = None, loss_chunk: int = 0):
    overrides = dict(loss_chunk_size=loss_chunk,
        vocab_size=args.bert_vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, max_position_embeddings=args.seq, hidden_dropout=0.0, attention_dropout=0.0,
        layernorm_order=order,
    )
    if divisible_by is not None:
        overrides["make_vocab_size_divisible_by"] = divisible_by
    config = MegatronBertConfig.from_preset("bert-tiny", **overrides)
    config._attn_implementation = attn or pair_attention("bert" if order == "pre" else "bert-post-ln", args)
    return MegahfBertForPreTraining(config)


def peer_bert(args, order: str = "pre"):
    """transformers' MegatronBert (pre-LN) or Bert (post-LN) of the same shape and epsilon as megahf's."""
    config_class, model_class = ((transformers.MegatronBertConfig, MegatronBertForPreTraining) if order == "pre"
                                 else (BertConfig, BertForPreTraining))
    config = config_class(
        vocab_size=args.bert_vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
        hidden_act="gelu", layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = pair_attention("bert" if order == "pre" else "bert-post-ln", args)
    return model_class(config)


def make_batch(pair: str, args, device: torch.device) -> dict:
    """One batch of random inputs with the labels of the pair's loss."""
    gen = torch.Generator().manual_seed(args.seed)
    if not pair.startswith("bert"):
        input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        # use_cache=False: a training step needs no KV cache (both families would otherwise build one).
        return {"input_ids": input_ids, "labels": input_ids, "use_cache": False}
    input_ids = torch.randint(1000, args.bert_vocab, (args.batch, args.seq), generator=gen)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, args.seq // 2:] = 1
    masked = torch.rand(input_ids.shape, generator=gen) < 0.15
    return {"input_ids": input_ids.to(device), "token_type_ids": token_type_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": input_ids.masked_fill(~masked, -100).to(device),
            "next_sentence_label": torch.randint(0, 2, (args.batch,), generator=gen).to(device)}


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Entry:
    key: str  # e.g. "gpt/megahf"
    label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict  # the model's inputs and labels
    times: list[float] = field(default_factory=list)  # wall seconds (time.perf_counter)
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds of the process, all threads
    first_loss: float | None = None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_entry(key, label, model, args, device, batch: dict, attn: str | None = None) -> Entry:
    model.to(device).train()
    expected = attn or pair_attention(key.split("/")[0], args)
    if model.config._attn_implementation != expected:
        raise RuntimeError(f"{label}: asked for attention {expected!r}, the model uses "
                           f"{model.config._attn_implementation!r}")
    implementation = {"fused": True} if args.adamw == "fused" else {"foreach": True}
    return Entry(key, label, model, torch.optim.AdamW(model.parameters(), lr=args.lr, **implementation), batch)


def step(entry: Entry, autocast, device: torch.device) -> tuple[float, float]:
    sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    with autocast():
        loss = entry.model(**entry.batch).loss
    loss.backward()
    entry.optimizer.step()
    entry.optimizer.zero_grad()
    sync(device)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if entry.first_loss is None:
        entry.first_loss = loss.item()
    return elapsed, cpu


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(entry: Entry, tokens: int) -> dict:
    tps = [tokens / t for t in entry.times]
    q1, med, q3 = quartiles(tps)
    return {"model": entry.label, "class": type(entry.model).__name__, "params": n_params(entry.model),
            "tokens_per_s_median": med, "tokens_per_s_q1": q1, "tokens_per_s_q3": q3, "tokens_per_s_iqr": q3 - q1,
            "tokens_per_s_best": max(tps), "step_s_median": statistics.median(entry.times),
            "cpu_s_median": statistics.median(entry.cpu_times), "first_loss": entry.first_loss,
            "step_s": entry.times, "cpu_s": entry.cpu_times}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round speed ratios a/b given the times (the same round: the same machine state)."""
    return quartiles([tb / ta for ta, tb in zip(a, b)])


def verdict(q1: float, q3: float) -> str:
    if q1 > 1.0:
        return "megahf faster"
    if q3 < 1.0:
        return "megahf slower"
    return "within noise"


def compare(a: Entry, b: Entry, tokens: int) -> dict:
    """megahf (a) over peer (b): the ratio of the medians of tokens/s, and the quartiles of the paired per-round
    ratios, which tell a real difference from noise. The same for CPU time, which other processes on the machine
    disturb much less than wall time (meaningful on a CPU device only)."""
    sa, sb = summarize(a, tokens), summarize(b, tokens)
    p1, pm, p3 = paired(a.times, b.times)
    c1, cm, c3 = paired(a.cpu_times, b.cpu_times)
    return {"megahf": a.key, "peer": b.key,
            "ratio_of_medians": sa["tokens_per_s_median"] / sb["tokens_per_s_median"],
            "paired_ratio_median": pm, "paired_ratio_q1": p1, "paired_ratio_q3": p3, "verdict": verdict(p1, p3),
            "cpu_paired_ratio_median": cm, "cpu_paired_ratio_q1": c1, "cpu_paired_ratio_q3": c3,
            "cpu_verdict": verdict(c1, c3)}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    headline_div = 1 if args.same_vocab else None  # None: the preset's default padding (128)
    pairs = list(PAIRS) if args.pair == "all" else [args.pair]
    builders = {"gpt": (megahf_gpt, peer_gpt, "GPT2LMHeadModel"),
                "llama": (megahf_llama, peer_llama, "LlamaForCausalLM"),
                "bert": (megahf_bert, peer_bert, "MegatronBertForPreTraining"),
                "bert-post-ln": (lambda a, d, loss_chunk=0: megahf_bert(a, d, "post", loss_chunk=loss_chunk),
                                 lambda a: peer_bert(a, "post"),
                                 "BertForPreTraining")}

    entries: list[Entry] = []
    comparisons: list[tuple[str, str, str]] = []  # (name, megahf key, peer key)
    for pair in pairs:
        build_megahf, build_peer, peer_name = builders[pair]
        batch = make_batch(pair, args, device)
        head_label = "megahf" + (" (vocab unpadded)" if args.same_vocab else " (vocab padded)")
        entries.append(make_entry(f"{pair}/megahf", head_label, build_megahf(args, headline_div), args, device,
                                  batch))
        entries.append(make_entry(f"{pair}/peer", peer_name, build_peer(args), args, device, batch))
        comparisons.append((pair, f"{pair}/megahf", f"{pair}/peer"))
        if args.padded_extra and args.same_vocab:
            entries.append(make_entry(f"{pair}/megahf-padded", "megahf (vocab padded)",
                                      build_megahf(args, None), args, device, batch))
            comparisons.append((f"{pair} (padded vocab)", f"{pair}/megahf-padded", f"{pair}/peer"))
        if args.loss_chunk:
            entries.append(make_entry(f"{pair}/megahf-chunked", f"megahf (loss chunk {args.loss_chunk})",
                                      build_megahf(args, None, loss_chunk=args.loss_chunk), args, device, batch))
            comparisons.append((f"{pair} (chunked loss)", f"{pair}/megahf-chunked", f"{pair}/peer"))
        if args.compile:
            chunk = args.loss_chunk
            compiled = build_megahf(args, None, loss_chunk=chunk)
            compile_layers(compiled)
            peer = build_peer(args)
            compile_layers(peer)
            entries.append(make_entry(f"{pair}/megahf-compiled", "megahf (compiled" + (", chunked)" if chunk else ")"),
                                      compiled, args, device, batch))
            entries.append(make_entry(f"{pair}/peer-compiled", f"{peer_name} (compiled)", peer, args, device, batch))
            comparisons.append((f"{pair} (both compiled)", f"{pair}/megahf-compiled", f"{pair}/peer-compiled"))
        if pair == "bert" and args.attn == "sdpa":
            # what a user gets: megahf's default sdpa against MegatronBert's only (eager) attention
            entries.append(make_entry("bert/megahf-sdpa", "megahf (sdpa, padded)",
                                      megahf_bert(args, None, attn="sdpa"), args, device, batch, attn="sdpa"))
            comparisons.append(("bert (megahf sdpa, padded)", "bert/megahf-sdpa", "bert/peer"))
    by_key = {e.key: e for e in entries}

    # Same-vocab pairs must hold the same parameters, or the comparison is not of the same work.
    for pair in pairs:
        m, p = by_key[f"{pair}/megahf"], by_key[f"{pair}/peer"]
        if args.same_vocab and n_params(m.model) != n_params(p.model):
            raise RuntimeError(f"{pair}: megahf has {n_params(m.model)} parameters, the peer {n_params(p.model)}")

    tokens = args.batch * args.seq

    ls = llama_shape(args)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  python {platform.python_version()}")
    print(f"device {device}  dtype {args.dtype}  threads {torch.get_num_threads()} (cores {os.cpu_count()})  "
          f"attention {args.attn}  AdamW {args.adamw}")
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, seq {args.seq}, batch {args.batch} "
          f"({tokens} tokens/step), vocab {args.vocab} (BERT {args.bert_vocab})")
    if "gpt" in pairs:
        print(f"  gpt:   ffn {args.gpt_ffn or 4 * args.hidden}, exact gelu, learned positions, LayerNorm, biases, tied")
    if "llama" in pairs:
        print(f"  llama: ffn {ls['ffn']}, kv heads {ls['kv_heads']}, rope theta {ls['rope_theta']}, "
              f"rms eps {ls['rms_eps']}, swiglu, no bias, untied")
    if any(p.startswith("bert") for p in pairs):
        print(f"  bert:  ffn {4 * args.hidden}, exact gelu, learned positions + 2 token types, tied MLM output, "
              "15% masked + sentence order (pre-LN vs MegatronBert; post-LN vs Bert)")
    if "bert" in pairs:
        print("  bert pair: eager attention on both sides (transformers' MegatronBert has no sdpa)")
    for e in entries:
        rows = e.model.get_output_embeddings().weight.shape[0]
        print(f"  {e.key:<24} {type(e.model).__name__:<28} params {n_params(e.model):>12,}  vocab rows {rows}")
    print(f"warm-up {args.warmup} + timed {args.reps} steps per model, interleaved over {len(entries)} models",
          flush=True)

    load_before = load_average()
    for _ in range(args.warmup):
        for e in entries:
            step(e, autocast, device)
    t0 = time.perf_counter()
    for r in range(args.reps):
        for e in entries:
            wall, cpu = step(e, autocast, device)
            e.times.append(wall)
            e.cpu_times.append(cpu)
        print(f"  round {r + 1}/{args.reps}: " + "  ".join(f"{e.key} {tokens / e.times[-1]:.0f}" for e in entries),
              file=sys.stderr, flush=True)
    timed_s = time.perf_counter() - t0

    summaries = {e.key: summarize(e, tokens) for e in entries}
    results = [(name, compare(by_key[a], by_key[b], tokens)) for name, a, b in comparisons]

    on_cpu = device.type == "cpu"
    print()
    header = (f"{'pair':<12} {'model':<26} {'params':>11} {'tok/s median':>12} {'IQR (q1-q3)':>13} {'best':>6} "
              f"{'step s':>7}" + (f" {'cpu s':>7}" if on_cpu else ""))
    print(header)
    print("-" * len(header))
    for e in entries:
        s = summaries[e.key]
        iqr = f"{s['tokens_per_s_q1']:.0f}-{s['tokens_per_s_q3']:.0f}"
        print(f"{e.key.split('/')[0]:<12} {s['model']:<26} {s['params']:>11,} {s['tokens_per_s_median']:>12.0f} "
              f"{iqr:>13} {s['tokens_per_s_best']:>6.0f} {s['step_s_median']:>7.3f}"
              + (f" {s['cpu_s_median']:>7.3f}" if on_cpu else ""))
    print()
    header = (f"{'megahf/peer':<26} {'ratio of medians':>16} {'paired [q1, q3]':>22}  {'verdict':<14}"
              + (f" {'cpu-time paired [q1, q3]':>25}  cpu verdict" if on_cpu else ""))
    print(header)
    print("-" * len(header))
    for name, c in results:
        wall = f"{c['paired_ratio_median']:.3f} [{c['paired_ratio_q1']:.3f}, {c['paired_ratio_q3']:.3f}]"
        cpu = f"{c['cpu_paired_ratio_median']:.3f} [{c['cpu_paired_ratio_q1']:.3f}, {c['cpu_paired_ratio_q3']:.3f}]"
        print(f"{name:<26} {c['ratio_of_medians']:>16.3f} {wall:>22}  {c['verdict']:<14}"
              + (f" {cpu:>25}  {c['cpu_verdict']}" if on_cpu else ""))
    print("ratio > 1: megahf faster. paired: median and quartiles of the per-round ratios; verdict: their")
    print("interquartile range lies above 1, below 1, or spans it."
          + (" cpu: the same from the process's CPU time per step." if on_cpu else ""))
    load_after = load_average()
    if load_before is not None and load_after is not None:
        print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after ({os.cpu_count()} cores, "
              f"this run uses {torch.get_num_threads()} threads)")
        if on_cpu and max(load_before, load_after) > (os.cpu_count() or 1) + 0.5:
            print("WARNING: other processes competed for the CPUs during the run; wall-clock tokens/s are disturbed, "
                  "the paired and CPU-time ratios much less.")

    record = {
        "benchmark": "megahf.train_step",
        "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
        "dtype": args.dtype, "threads": torch.get_num_threads(), "attention": args.attn, "adamw": args.adamw,
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "seq": args.seq,
                  "batch": args.batch, "vocab": args.vocab, "bert_vocab": args.bert_vocab,
                  "gpt_ffn": args.gpt_ffn or 4 * args.hidden,
                  "llama": ls},
        "same_vocab": args.same_vocab, "loss_chunk": args.loss_chunk, "compile": args.compile, "warmup": args.warmup, "reps": args.reps, "timed_s": timed_s,
        "load_average_before": load_before, "load_average_after": load_after, "cpu_count": os.cpu_count(),
        "models": summaries,
        "comparisons": {name: c for name, c in results},
    }
    line = json.dumps(record, sort_keys=True)
    print("JSON " + line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    del entries, by_key
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
