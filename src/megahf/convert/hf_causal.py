"""transformers' GPT2LMHeadModel and LlamaForCausalLM folders <-> megahf's GPT, tensor by tensor.

GPT-2 keeps its linear layers as `Conv1D` ([in, out], the transpose of `nn.Linear`) and its QKV as one [h, 3h] matrix
ordered [all queries; all keys; all values]; megahf (Megatron-Core) orders QKV rows per query group
[the group's queries; its key; its value]. Llama keeps q/k/v and gate/up/down apart. Both rotate RoPE by halves
(`rotate_half` on cos/sin of [freqs, freqs]), which is also megahf's (and Megatron-Core's non-interleaved) layout, so
no row permutation is needed; the weights of Meta's original interleaved Llama release are permuted by transformers'
own converter before they reach a LlamaForCausalLM folder. Llama's RoPE scaling (`rope_parameters`, or the legacy
`rope_scaling` and `rope_theta`) is carried over as it is: megahf computes the frequencies with the same transformers
functions (linear, dynamic, yarn, longrope, llama3).

Vocabulary: megahf's padded rows are all written (transformers then sees `vocab_size` = the padded rows, as NVIDIA's
Megatron checkpoints on the Hub do) and megahf's real vocabulary is kept in config.json as `megahf_vocab_size`, so a
round trip is lossless; a folder without it takes every row as a token and pads to 128 with zero rows.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .common import ConversionError, LoadedCheckpoint, TensorRef, check_shapes, progress
from .safetensors_stream import read_safetensors, write_safetensors
from .tensor_parts import grouped_qkv, padded_rows, row_range, transposed

VOCAB_KEY = "megahf_vocab_size"
# transformers' activation_function -> megahf's activation (gelu_new, gelu_pytorch_tanh and gelu_fast are the same
# tanh approximation, written three ways)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh"}


# ------------------------------------------------------------------------------------------------ QKV layouts


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron-Core's fused QKV rows from separate q [heads*d, ...], k and v [groups*d, ...]."""
    rest = tuple(q.shape[1:])
    d = k.shape[0] // groups
    return torch.cat([q.reshape(groups, -1, d, *rest), k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)],
                     dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = tuple(qkv.shape[1:])
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, -1, *rest)
    d = grouped.shape[2]
    q = grouped[:, :per_group].reshape(heads * d, *rest)
    return q.clone(), grouped[:, per_group].reshape(groups * d, *rest).clone(), \
        grouped[:, per_group + 1].reshape(groups * d, *rest).clone()


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        raise ConversionError(f"{tensor.shape[0]} vocabulary rows do not fit in {rows}")
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _ref(shape, dtype, load: Callable[[], torch.Tensor]) -> TensorRef:
    return TensorRef(tuple(shape), dtype, load)


def _read_folder(path: str | os.PathLike, model_type: str) -> tuple[dict, dict[str, TensorRef]]:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json (a transformers model folder written by save_pretrained)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != model_type:
        raise ConversionError(f"{path}: model_type={config.get('model_type')!r}, expected {model_type!r}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no .safetensors weights (pickled .bin weights are not read: convert them "
                              "with transformers' save_pretrained(safe_serialization=True) first)")
    return config, read_safetensors(files)


def _vocab_of(config: dict, rows: int) -> int:
    return int(config.get(VOCAB_KEY) or rows)


# ------------------------------------------------------------------------------------------------ GPT-2


def read_hf_gpt2(path: str | os.PathLike, overrides: dict | None = None) -> LoadedCheckpoint:
    from ..models.gpt.configuration_megatron_gpt import MegatronGPTConfig

    import transformers

    hf, tensors = _read_folder(path, "gpt2")
    hf = transformers.GPT2Config(**hf).to_dict()  # a field the file lacks: transformers' own default for it
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConversionError(f"{path}: activation_function={act!r}: megahf's GPT-2 MLP is GeLU, exact or "
                              f"tanh-approximated ({', '.join(GPT2_ACTIVATIONS)})")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConversionError(f"{path}: GPT-2 attention scaling other than 1/sqrt(head size) is not supported")
    rows = tensors[prefix + "wte.weight"].shape[0]
    hidden, heads = hf["n_embd"], hf["n_head"]
    fields = dict(vocab_size=_vocab_of(hf, rows), hidden_size=hidden, num_layers=hf["n_layer"],
                  num_attention_heads=heads, ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
                  max_position_embeddings=hf["n_positions"], layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                  activation=GPT2_ACTIVATIONS[act], normalization="LayerNorm",
                  position_embedding_type="learned_absolute",
                  add_bias_linear=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
                  hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
                  init_method_std=hf.get("initializer_range", 0.02),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    config = MegatronGPTConfig(**{**fields, **(overrides or {})})
    padded = config.padded_vocab_size
    out: dict[str, TensorRef] = {}

    def linear(name):  # Conv1D [in, out] -> Linear [out, in]
        return transposed(tensors[name])

    embedding = tensors[prefix + "wte.weight"]
    out["model.embedding.word_embeddings.weight"] = padded_rows(embedding, padded,
                                                                lambda: _pad_rows(embedding.load(), padded))
    out["model.embedding.position_embeddings.weight"] = tensors[prefix + "wpe.weight"]
    for i in range(config.num_layers):
        src, dst = f"{prefix}h.{i}.", f"model.decoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"input_layernorm.{kind}"] = tensors[src + f"ln_1.{kind}"]
            out[dst + f"pre_mlp_layernorm.{kind}"] = tensors[src + f"ln_2.{kind}"]
        # [all queries; all keys; all values] (the weight transposed from Conv1D) -> Megatron-Core's per-head order
        for kind, ref in (("weight", transposed(tensors[src + "attn.c_attn.weight"])),
                          ("bias", tensors[src + "attn.c_attn.bias"])):
            q, k, v = (row_range(ref, i * hidden, (i + 1) * hidden) for i in range(3))
            out[dst + f"self_attention.linear_qkv.{kind}"] = grouped_qkv(
                q, k, v, heads, load=lambda r=ref: fuse_qkv(*r.load().chunk(3, dim=0), groups=heads).contiguous())
        out[dst + "self_attention.linear_proj.weight"] = linear(src + "attn.c_proj.weight")
        out[dst + "self_attention.linear_proj.bias"] = tensors[src + "attn.c_proj.bias"]
        out[dst + "mlp.linear_fc1.weight"] = linear(src + "mlp.c_fc.weight")
        out[dst + "mlp.linear_fc1.bias"] = tensors[src + "mlp.c_fc.bias"]
        out[dst + "mlp.linear_fc2.weight"] = linear(src + "mlp.c_proj.weight")
        out[dst + "mlp.linear_fc2.bias"] = tensors[src + "mlp.c_proj.bias"]
    for kind in ("weight", "bias"):
        out[f"model.decoder.final_layernorm.{kind}"] = tensors[prefix + f"ln_f.{kind}"]
    if not config.tie_word_embeddings:
        head = tensors["lm_head.weight"]
        out["output_layer.weight"] = padded_rows(head, padded, lambda: _pad_rows(head.load(), padded))
    _check_all_used(path, tensors, out, ignore=(".attn.bias", ".attn.masked_bias", "lm_head.weight"))
    loaded = LoadedCheckpoint(config, "MegatronGPTForCausalLM", out)
    check_shapes(loaded, str(path))
    return loaded


def _check_all_used(path, tensors: dict, out: dict, ignore: tuple = ()) -> None:
    """Unknown keys in a transformers folder are errors, not silently dropped weights."""
    used = {id(ref) for ref in out.values()}
    known_suffixes = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "c_attn.weight", "c_attn.bias",
                      "c_proj.weight", "c_proj.bias", "c_fc.weight", "c_fc.bias", "wte.weight", "wpe.weight",
                      "ln_f.weight", "ln_f.bias")
    for name, ref in tensors.items():
        if id(ref) in used or name.endswith(known_suffixes) or name.endswith(ignore):
            continue
        raise ConversionError(f"{path}: unknown key {name!r} (no megahf parameter for it)")


def _require(config, checks: list[tuple[bool, str]], target: str) -> None:
    for ok, why in checks:
        if not ok:
            raise ConversionError(f"this model cannot be written as {target}: {why}; write it as megahf or megatron")


def write_hf_gpt2(loaded: LoadedCheckpoint, dst: Path, show_progress: bool = True) -> None:
    import transformers

    c = loaded.config
    _require(c, [(c.model_type == "megatron_gpt", "it is not a GPT"),
                 (c.position_embedding_type == "learned_absolute", "GPT-2 has learned positions, not RoPE"),
                 (c.normalization == "LayerNorm", "GPT-2 uses LayerNorm"),
                 (c.activation in ("gelu", "gelu_tanh"), "GPT-2's MLP is GeLU, not SwiGLU"),
                 (c.add_bias_linear, "GPT-2's linear layers have biases"),
                 (c.num_query_groups == c.num_attention_heads, "GPT-2 has no grouped-query attention")], "hf-gpt2")
    hf = transformers.GPT2Config(
        vocab_size=c.padded_vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
        n_layer=c.num_layers, n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size,
        activation_function="gelu" if c.activation == "gelu" else "gelu_new",
        layer_norm_epsilon=c.layernorm_epsilon, resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout,
        attn_pdrop=c.attention_dropout, initializer_range=c.init_method_std, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, **{VOCAB_KEY: c.vocab_size})
    hf.architectures = ["GPT2LMHeadModel"]
    t = loaded.tensors
    heads = c.num_attention_heads
    out: dict[str, TensorRef] = {}

    def conv(name):  # Linear [out, in] -> Conv1D [in, out]
        ref = t[name]
        return _ref(ref.shape[::-1], ref.dtype, lambda: ref.load().t().contiguous())

    out["transformer.wte.weight"] = t["model.embedding.word_embeddings.weight"]
    out["transformer.wpe.weight"] = t["model.embedding.position_embeddings.weight"]
    for i in range(c.num_layers):
        src, dst_ = f"model.decoder.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[dst_ + f"ln_1.{kind}"] = t[src + f"input_layernorm.{kind}"]
        qkv = t[src + "self_attention.linear_qkv.weight"]
        out[dst_ + "attn.c_attn.weight"] = _ref((c.hidden_size, 3 * c.hidden_size), qkv.dtype, lambda r=qkv: torch.cat(
            split_qkv(r.load(), heads, heads), dim=0).t().contiguous())
        qkv_bias = t[src + "self_attention.linear_qkv.bias"]
        out[dst_ + "attn.c_attn.bias"] = _ref((3 * c.hidden_size,), qkv_bias.dtype, lambda r=qkv_bias: torch.cat(
            split_qkv(r.load(), heads, heads)))
        out[dst_ + "attn.c_proj.weight"] = conv(src + "self_attention.linear_proj.weight")
        out[dst_ + "attn.c_proj.bias"] = t[src + "self_attention.linear_proj.bias"]
        for kind in ("weight", "bias"):
            out[dst_ + f"ln_2.{kind}"] = t[src + f"pre_mlp_layernorm.{kind}"]
        out[dst_ + "mlp.c_fc.weight"] = conv(src + "mlp.linear_fc1.weight")
        out[dst_ + "mlp.c_fc.bias"] = t[src + "mlp.linear_fc1.bias"]
        out[dst_ + "mlp.c_proj.weight"] = conv(src + "mlp.linear_fc2.weight")
        out[dst_ + "mlp.c_proj.bias"] = t[src + "mlp.linear_fc2.bias"]
    for kind in ("weight", "bias"):
        out[f"transformer.ln_f.{kind}"] = t[f"model.decoder.final_layernorm.{kind}"]
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"]
    _write_folder(hf, out, dst, "hf-gpt2", show_progress)


# ------------------------------------------------------------------------------------------------ Llama


def read_hf_llama(path: str | os.PathLike, overrides: dict | None = None) -> LoadedCheckpoint:
    from ..models.gpt.configuration_megatron_gpt import MegatronGPTConfig

    hf, tensors = _read_folder(path, "llama")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{path}: head_dim={hf['head_dim']} differs from hidden_size / heads = "
                              f"{hidden // heads}, which megahf's attention assumes")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act={hf.get('hidden_act')!r}: megahf's gated MLP is SwiGLU (silu)")
    if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        raise ConversionError(f"{path}: attention_bias={hf.get('attention_bias')} but mlp_bias={hf.get('mlp_bias')}: "
                              "megahf has biases on every linear layer or on none")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    # RoPE as the folder gives it, in any of transformers' spellings (rope_parameters; legacy rope_scaling and
    # rope_theta): megahf's config standardizes them with transformers' own code, as LlamaConfig does
    rope = {key: hf[key] for key in ("rope_parameters", "rope_scaling", "rope_theta") if hf.get(key) is not None}
    fields = dict(vocab_size=_vocab_of(hf, rows), hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                  num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=hf["intermediate_size"],
                  max_position_embeddings=hf["max_position_embeddings"], position_embedding_type="rope", **rope,
                  normalization="RMSNorm",
                  layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
                  add_bias_linear=bool(hf.get("attention_bias")),
                  tie_word_embeddings=hf.get("tie_word_embeddings", False),
                  attention_dropout=hf.get("attention_dropout", 0.0), hidden_dropout=0.0,
                  init_method_std=hf.get("initializer_range", 0.02),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    try:
        config = MegatronGPTConfig(**{**fields, **(overrides or {})})
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from None
    padded = config.padded_vocab_size
    bias_kinds = ("weight", "bias") if config.add_bias_linear else ("weight",)
    out: dict[str, TensorRef] = {}
    embedding = tensors["model.embed_tokens.weight"]
    out["model.embedding.word_embeddings.weight"] = padded_rows(embedding, padded,
                                                                lambda: _pad_rows(embedding.load(), padded))
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"model.decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = tensors[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = tensors[src + "post_attention_layernorm.weight"]
        for kind in bias_kinds:
            q, k, v = (tensors[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            out[dst + f"self_attention.linear_qkv.{kind}"] = grouped_qkv(
                q, k, v, groups, load=lambda q=q, k=k, v=v: fuse_qkv(q.load(), k.load(), v.load(), groups))
            out[dst + f"self_attention.linear_proj.{kind}"] = tensors[src + f"self_attn.o_proj.{kind}"]
            out[dst + f"mlp.linear_fc1_gate.{kind}"] = tensors[src + f"mlp.gate_proj.{kind}"]
            out[dst + f"mlp.linear_fc1_up.{kind}"] = tensors[src + f"mlp.up_proj.{kind}"]
            out[dst + f"mlp.linear_fc2.{kind}"] = tensors[src + f"mlp.down_proj.{kind}"]
    out["model.decoder.final_layernorm.weight"] = tensors["model.norm.weight"]
    if not config.tie_word_embeddings:
        head = tensors["lm_head.weight"]
        out["output_layer.weight"] = padded_rows(head, padded, lambda: _pad_rows(head.load(), padded))
    used = {id(ref) for ref in out.values()} | {id(tensors[f"model.layers.{i}.self_attn.{p}_proj.{kind}"])
                                                for i in range(config.num_layers) for p in "qkv" for kind in bias_kinds}
    for name, ref in tensors.items():
        if id(ref) not in used and name not in ("model.embed_tokens.weight", "lm_head.weight") and \
                not name.endswith("rotary_emb.inv_freq"):
            raise ConversionError(f"{path}: unknown key {name!r} (no megahf parameter for it)")
    loaded = LoadedCheckpoint(config, "MegatronGPTForCausalLM", out)
    check_shapes(loaded, str(path))
    return loaded


def write_hf_llama(loaded: LoadedCheckpoint, dst: Path, show_progress: bool = True) -> None:
    import transformers

    c = loaded.config
    _require(c, [(c.model_type == "megatron_gpt", "it is not a GPT"),
                 (c.position_embedding_type == "rope", "Llama has RoPE, not learned positions"),
                 (c.normalization == "RMSNorm", "Llama uses RMSNorm"),
                 (c.activation == "swiglu", "Llama's MLP is SwiGLU")], "hf-llama")
    hf = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.layernorm_epsilon, rope_parameters=copy.deepcopy(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.add_bias_linear, mlp_bias=c.add_bias_linear,
        attention_dropout=c.attention_dropout, initializer_range=c.init_method_std, hidden_act="silu",
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, **{VOCAB_KEY: c.vocab_size})
    hf.architectures = ["LlamaForCausalLM"]
    t = loaded.tensors
    heads, groups = c.num_attention_heads, c.num_query_groups
    d = c.head_dim
    out: dict[str, TensorRef] = {"model.embed_tokens.weight": t["model.embedding.word_embeddings.weight"]}
    kinds = ("weight", "bias") if c.add_bias_linear else ("weight",)
    for i in range(c.num_layers):
        src, dst_ = f"model.decoder.layers.{i}.", f"model.layers.{i}."
        out[dst_ + "input_layernorm.weight"] = t[src + "input_layernorm.weight"]
        for kind in kinds:
            qkv = t[src + f"self_attention.linear_qkv.{kind}"]
            rest = tuple(qkv.shape[1:])
            for index, (p, rows) in enumerate((("q", heads * d), ("k", groups * d), ("v", groups * d))):
                out[dst_ + f"self_attn.{p}_proj.{kind}"] = _ref(
                    (rows, *rest), qkv.dtype, lambda r=qkv, index=index: split_qkv(r.load(), heads, groups)[index])
            out[dst_ + f"self_attn.o_proj.{kind}"] = t[src + f"self_attention.linear_proj.{kind}"]
            out[dst_ + f"mlp.gate_proj.{kind}"] = t[src + f"mlp.linear_fc1_gate.{kind}"]
            out[dst_ + f"mlp.up_proj.{kind}"] = t[src + f"mlp.linear_fc1_up.{kind}"]
            out[dst_ + f"mlp.down_proj.{kind}"] = t[src + f"mlp.linear_fc2.{kind}"]
        out[dst_ + "post_attention_layernorm.weight"] = t[src + "pre_mlp_layernorm.weight"]
    out["model.norm.weight"] = t["model.decoder.final_layernorm.weight"]
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"]
    _write_folder(hf, out, dst, "hf-llama", show_progress)


def _write_folder(hf_config, tensors: dict[str, TensorRef], dst: Path, label: str, show_progress: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(dst)
    bar = progress(len(tensors), label, show_progress)
    write_safetensors(dst / "model.safetensors", tensors, on_tensor=lambda _: bar.update(1))
    bar.close()


__all__ = ["fuse_qkv", "read_hf_gpt2", "read_hf_llama", "split_qkv", "write_hf_gpt2", "write_hf_llama"]
