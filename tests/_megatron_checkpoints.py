"""Real Megatron-Core models (megatron-core 0.16.1 on CPU) and their checkpoints in Megatron-LM's legacy layout, made
here independently of megahf's converter, from Megatron's documented rules:

* a file per rank, `mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`, under `release/` or `iter_{:07d}/`, the tracker
  `latest_checkpointed_iteration.txt` beside them (megatron/training/checkpointing.py: get_checkpoint_name);
* tensor parallelism (Shoeybi et al. 2019, megatron/core/tensor_parallel/layers.py): ColumnParallelLinear
  (linear_qkv, linear_fc1, the output layer) and VocabParallelEmbedding split dim 0, RowParallelLinear (linear_proj,
  linear_fc2) splits dim 1 of the weight and keeps the bias whole; norms are replicated;
* the fused QKV rows are [query group][its queries; key; value], so a dim-0 split is a split by groups; SwiGLU's
  fused linear_fc1 holds [gate; up] per rank (megatron/core/transformer/mlp.py chunks the local output in two);
* pipeline stages hold consecutive layers numbered from 0 within the stage; the first stage the embedding, the last
  the final norm and output layer, and with tied embeddings the last stage a copy of the word embeddings as
  `output_layer.weight` (Megatron-Core) / `word_embeddings_for_head.weight` (legacy);
* legacy names and checkpoint_version 1.0's QKV order [heads, head size, 3] per rank (megatron/training/
  checkpointing.py: fix_query_key_value_ordering).
"""

from __future__ import annotations

import argparse
import random
import unittest.mock
from pathlib import Path

import numpy as np
import torch

HIDDEN, HEADS, LAYERS, SEQ = 64, 4, 4, 12


def perturb_small_params(model) -> None:
    """Non-zero biases and norms, so that a swapped bias or norm cannot go unnoticed."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)


def gpt_model(style: str, padded_vocab: int, rope_args: dict | None = None):
    """A Megatron-Core GPTModel, GPT-2 style (LayerNorm, GeLU, learned positions, tied) or Llama style (RMSNorm,
    SwiGLU, RoPE, GQA 4:2, no biases, untied). Llama style takes Megatron-LM's RoPE arguments (`rope_args`, as
    `gpt_args` stores them) the way Megatron-LM builds its GPTModel from them: `use_rope_scaling` and
    `rope_scaling_factor` as GPTModel's `rope_scaling` and `rope_scaling_factor`, `rotary_seq_len_interpolation_factor`
    as its `seq_len_interpolation_factor`, and for `position_embedding_type="yarn"` the `yarn_*` attributes that
    megatron/training/argument_utils.py puts on the TransformerConfig (YarnRotaryEmbedding's defaults where unset)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
                  hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5, params_dtype=torch.float32)
    if style == "gpt2":
        config = TransformerConfig(**common)
        spec, kwargs = get_gpt_layer_local_spec(), dict(share_embeddings_and_output_weights=True,
                                                         position_embedding_type="learned_absolute")
    else:
        rope = {"rotary_base": 10000, **(rope_args or {})}
        config = TransformerConfig(**common, num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
                                   activation_func=F.silu, add_bias_linear=False, ffn_hidden_size=96)
        spec, kwargs = get_gpt_layer_local_spec(normalization="RMSNorm"), dict(
            share_embeddings_and_output_weights=False, rotary_base=rope["rotary_base"],
            position_embedding_type=rope.get("position_embedding_type", "rope"),
            rope_scaling=rope.get("use_rope_scaling", False), rope_scaling_factor=rope.get("rope_scaling_factor", 8.0),
            seq_len_interpolation_factor=rope.get("rotary_seq_len_interpolation_factor"))
        if kwargs["position_embedding_type"] == "yarn":
            for name, arg, default in (("rotary_scaling_factor", "rotary_scaling_factor", 1.0),
                                       ("original_max_position_embeddings", "yarn_original_max_position_embeddings",
                                        4096), ("beta_fast", "yarn_beta_fast", 32.0),
                                       ("beta_slow", "yarn_beta_slow", 1.0), ("mscale", "mscale", 1.0),
                                       ("mscale_all_dim", "mscale_all_dim", 0.0),
                                       ("correction_range_round_to_int", "yarn_correction_range_round_to_int", True)):
                setattr(config, "yarn_" + name, default if rope.get(arg) is None else rope[arg])
    torch.manual_seed(0)
    # YaRN fills its cos/sin cache on `torch.cuda.current_device()` at construction: pointed at the CPU here
    with unittest.mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        model = GPTModel(config, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=64,
                         **kwargs).eval()
    perturb_small_params(model)
    return model


def gpt_args(style: str, vocab: int, padded_vocab: int, tp: int, pp: int, rope_args: dict | None = None
             ) -> argparse.Namespace:
    """The training arguments Megatron-LM would have pickled (megatron/training/arguments.py names); `rope_args` adds
    or replaces Llama style's RoPE arguments."""
    args = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, kv_channels=HIDDEN // HEADS,
                max_position_embeddings=64, seq_length=SEQ, padded_vocab_size=padded_vocab, vocab_size=vocab,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, norm_epsilon=1e-5,
                init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=128)
    if style == "gpt2":
        args.update(ffn_hidden_size=4 * HIDDEN, normalization="LayerNorm", swiglu=False, add_bias_linear=True,
                    position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=False,
                    group_query_attention=False, num_query_groups=1)
    else:
        args.update(ffn_hidden_size=96, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                    position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
                    untie_embeddings_and_output_weights=True, group_query_attention=True, num_query_groups=2,
                    tokenizer_type="HuggingFaceTokenizer", use_rope_scaling=False, rope_scaling_factor=8.0,
                    rotary_seq_len_interpolation_factor=None)
        args.update(rope_args or {})
    return argparse.Namespace(**args)


# The args Megatron-LM's check_checkpoint_args (megatron/training/checkpointing.py) reads without a default when a run
# resumes a checkpoint without --finetune (the vocabulary ones and tokenizer_type when it passes --vocab-file, the
# parallel sizes for checkpoint_version 3.0, data_parallel_random_init when it passes that flag)
RESUME_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
               "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "tensor_model_parallel_size",
               "pipeline_model_parallel_size", "data_parallel_random_init")


def bert_model(padded_vocab: int):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               layernorm_epsilon=1e-5, params_dtype=torch.float32)
    torch.manual_seed(0)
    model = BertModel(config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec, vocab_size=padded_vocab,
                      max_sequence_length=64, share_embeddings_and_output_weights=True, add_binary_head=True).eval()
    perturb_small_params(model)
    return model


def bert_args(vocab: int, padded_vocab: int, tp: int, pp: int) -> argparse.Namespace:
    return argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              ffn_hidden_size=4 * HIDDEN, max_position_embeddings=64, seq_length=SEQ,
                              padded_vocab_size=padded_vocab, vocab_size=vocab, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, bert_binary_head=True, layernorm_epsilon=1e-5,
                              hidden_dropout=0.0, attention_dropout=0.0)


def core_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
          "mlp.linear_fc1.bias")
ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def split(state: dict, tp: int, pp: int, swiglu: bool, tied: bool) -> dict[tuple[int, int], dict]:
    """Megatron's TP x PP split of a full Megatron-Core state dict: {(tp rank, pp rank): that rank's state dict}."""
    layers = 1 + max(int(k.split(".")[2]) for k in state if ".layers." in k)
    per_stage = layers // pp
    shards = {(t, p): {} for t in range(tp) for p in range(pp)}
    for key, tensor in state.items():
        if ".layers." in key:
            body, _, number, rest = key.split(".", 3)
            stage, local = int(number) // per_stage, int(number) % per_stage
            name = f"{body}.layers.{local}.{rest}"
        else:
            stage = 0 if key.startswith("embedding.") else pp - 1
            name, rest = key, key
        if swiglu and rest.startswith("mlp.linear_fc1."):
            gate, up = tensor.chunk(2)
            parts = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        elif rest in COLUMN or key in VOCAB:
            parts = list(tensor.chunk(tp, dim=0))
        elif rest in ROW:
            parts = list(tensor.chunk(tp, dim=1))
        else:
            parts = [tensor] * tp
        for t in range(tp):
            shards[(t, stage)][name] = parts[t].clone()
        if key == "embedding.word_embeddings.weight" and tied and pp > 1:
            for t in range(tp):
                shards[(t, pp - 1)]["output_layer.weight"] = parts[t].clone()
    return shards


def to_legacy(shard: dict, heads_per_rank: int, version: float) -> dict:
    """A Megatron-Core shard in legacy names, nested as megatron/legacy/model saves it, QKV in `version`'s order."""
    layer_names = {"input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attention.query_key_value",
                   "self_attention.linear_proj": "self_attention.dense",
                   "pre_mlp_layernorm": "post_attention_layernorm",
                   "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}
    encoder, embedding, out = {}, {}, {}
    for key, tensor in shard.items():
        if key.startswith("decoder.layers."):
            _, _, number, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module == "self_attention.linear_qkv" and version == 1.0:
                rest_shape = tensor.shape[1:]  # [np, 3, hn] -> [np, hn, 3]
                tensor = tensor.view(heads_per_rank, 3, -1, *rest_shape).transpose(1, 2).reshape(tensor.shape)
            encoder[f"layers.{number}.{layer_names[module]}.{kind}"] = tensor
        elif key.startswith("decoder.final_layernorm."):
            encoder["final_layernorm." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("embedding."):
            _, module, kind = key.split(".")
            embedding.setdefault(module, {})[kind] = tensor
        elif key == "output_layer.weight":
            out["word_embeddings_for_head"] = {"weight": tensor}
        else:
            raise AssertionError(key)
    language_model = {}
    if embedding:
        language_model["embedding"] = embedding
    language_model["encoder"] = encoder
    return {"language_model": language_model, **out}


def to_te_names(shard: dict) -> dict:
    """Transformer Engine's spec: the norm before attention / MLP lives on the next linear layer."""
    renamed = {}
    for key, tensor in shard.items():
        key = key.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        key = key.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        renamed[key] = tensor
    return renamed


def save(shards: dict, root: Path, args, version: float = 3.0, iteration: int | None = 1000) -> Path:
    """Write shards as Megatron-LM does; returns the checkpoint root."""
    tp = 1 + max(t for t, _ in shards)
    pp = 1 + max(p for _, p in shards)
    folder = root / ("release" if iteration is None else f"iter_{iteration:07d}")
    for (t, p), model in shards.items():
        shard_dir = folder / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        shard_dir.mkdir(parents=True)
        rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state()}]
        torch.save({"model": model, "args": args, "checkpoint_version": version, "iteration": iteration or 0,
                    "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
                    "rng_state": rng}, shard_dir / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    return root


def load_shard(path):
    """A Megatron-LM checkpoint file, read with weights_only=True: its args are an argparse.Namespace."""
    # allow the Namespace only for this load, and only if megatron.core has not registered it for the process
    # (leaving the context would unregister it under megatron.core's own loads)
    extra = [] if argparse.Namespace in torch.serialization.get_safe_globals() else [argparse.Namespace]
    with torch.serialization.safe_globals(extra):
        return torch.load(path, weights_only=True)


def gpt_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's own forward. Its RoPE moves its frequencies to `torch.cuda.current_device()` on first use:
    pointed at the CPU here, a fourth CUDA-only spot sidestepped (FACTS.md lists the other three)."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq)[None].expand(input_ids.shape[0], -1)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad(), unittest.mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        return model(input_ids, positions, causal)
