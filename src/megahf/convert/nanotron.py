"""nanotron's Llama checkpoints (one safetensors file per tensor per shard) <-> megahf, without nanotron installed.

The layout, as nanotron's source writes it (github.com/huggingface/nanotron, 0.4 to 2411b022: src/nanotron/serialize/
weights.py `save_weights`, serialize/utils.py `get_path`, serialize/metadata.py `TensorMetadata`, constants.py,
models/llama.py, examples/llama/convert_hf_to_nanotron.py):

    ROOT/model_config.json      the model's LlamaConfig as a dict (vocab_size, hidden_size, num_key_value_heads,
                                tie_word_embeddings, ...; later versions add rope_theta and rope_interleaved)
    ROOT/model/<parameter name with "." as "/">/model_weight[_pp-rank-P-of-N_tp-rank-T-of-M].safetensors
                                one tensor "data"; sharded parameters carry the rank suffix and metadata
                                {"version": "1.2", "unsharded_shape": "(rows, cols)",
                                 "local_global_slices_pairs": "l0,l1,None|...#g0,g1,None|...;..."}
Names: `model.token_position_embeddings.pp_block.token_embedding.weight`, `model.decoder.{i}.pp_block.
{input_layernorm, attn.qkv_proj, attn.o_proj, post_attention_layernorm, mlp.gate_up_proj, mlp.down_proj}.weight`,
`model.final_layer_norm.pp_block.weight`, `model.lm_head.pp_block.weight` (absent when tied: a tied pair is saved
once, under the embedding's name). qkv_proj is [all queries; all keys; all values] and gate_up_proj [gate; up].

RoPE scaling: nanotron's LlamaConfig has a `rope_scaling` field that its Llama never reads (0.4 to 2411b022) and that
its Hugging Face converter (examples/llama/convert_weights.py) copies to and from transformers' config. megahf reads
and writes it as that converter does, in transformers' form ({"rope_type": "llama3", "factor": 8.0, ...}), so a
scaled model keeps its scaling through a nanotron folder, and says in the proof's notes that nanotron itself computes
it unscaled.

RoPE as nanotron computes it: nanotron 0.4 rotates adjacent pairs (GPT-J, "interleaved") with base 10000 whatever
its config says; `rope_theta` (2024-05) and `rope_interleaved` (2024-09, default False since) came later and are
honoured when present, so an absent `rope_interleaved` means interleaved and an absent `rope_theta` 10000.
Interleaved query and key rows are de-interleaved per head into megahf's (and transformers') halves layout.
Reading follows the slices metadata, so any TP x PP reads; numpy 2 makes nanotron write its sizes as
'np.int64(128)', which reads too. Writing is TP=1, PP=1, interleaved with `rope_interleaved: true` and tensor
version 1.2: what every nanotron loads and computes alike (0.4's loader takes versions up to 1.2, the current one up
to 1.5). megahf keeps the tokenizer's vocabulary in a side file `megahf.json` (nanotron's config would refuse an
unknown key).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .common import ConversionError, LoadedCheckpoint, TensorRef, check_shapes, progress
from .hf_causal import _pad_rows, fuse_qkv, split_qkv
from .safetensors_stream import write_safetensors

CONFIG_FILE = "model_config.json"
SIDE_FILE = "megahf.json"
CHECKPOINT_VERSION = "1.2"  # the newest that nanotron 0.4 loads (its constants.py); later ones load it too
DEFAULT_ROPE_THETA = 10000.0  # nanotron before `rope_theta`: flash_attn's RotaryEmbedding default base
NANOTRON_IGNORES_SCALING = (
    "rope_scaling={scaling!r}: megahf applies it as transformers does (the folder nanotron's own converter writes from "
    "this config scales too), but nanotron's Llama keeps the field unused and computes unscaled RoPE")
EMBEDDING = "model.token_position_embeddings.pp_block.token_embedding.weight"
LM_HEAD = "model.lm_head.pp_block.weight"
FINAL_NORM = "model.final_layer_norm.pp_block.weight"
LAYER = "model.decoder.{i}.pp_block."
_FILE = re.compile(r"model_(weight|bias)(?:_pp-rank-(\d+)-of-(\d+)_tp-rank-(\d+)-of-(\d+))?\.safetensors")
_SIZE = re.compile(r"\s*(?:np\.u?int\d*\((\d+)\)|(\d+))\s*")  # 128, or numpy 2's repr of a numpy integer


def _parse_shape(text: str, path: Path) -> tuple[int, ...]:
    """`unsharded_shape` as nanotron writes it, str(tuple(shape)): '(128, 64)', or under numpy 2 (its sizes are numpy
    integers there) '(np.int64(128), 64)'."""
    inner = text.strip()
    inner = inner[1:-1] if inner.startswith("(") and inner.endswith(")") else inner
    sizes = []
    for part in inner.split(","):
        match = _SIZE.fullmatch(part)
        if match is None and part.strip():
            raise ConversionError(f"{path}: unsharded_shape={text!r} in its metadata is not a shape (sizes as integers "
                                  "or numpy integers); the file is damaged: rewrite it from nanotron")
        if match is not None:
            sizes.append(int(match.group(1) or match.group(2)))
    if not sizes:
        raise ConversionError(f"{path}: unsharded_shape={text!r} in its metadata is empty; the file is damaged: "
                              "rewrite it from nanotron")
    return tuple(sizes)


def _parse_slices(text: str) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    def parse(part: str) -> tuple[slice, ...]:
        return tuple(slice(*(None if x == "None" else int(x) for x in s.split(","))) for s in part.split("|"))
    pairs = []
    for pair in text.split(";"):
        local, global_ = pair.split("#")
        pairs.append((parse(local), parse(global_)))
    return pairs


def _format_slices(shape: tuple[int, ...]) -> str:
    whole = "|".join(f"0,{size},None" for size in shape)
    return f"{whole}#{whole}"


def _tensor_files(root: Path) -> dict[str, list[Path]]:
    """nanotron parameter name -> its shard files."""
    model_dir = root / "model"
    if not model_dir.is_dir():
        raise ConversionError(f"{root}: no model/ folder (a nanotron checkpoint has model/<param path>/*.safetensors)")
    files: dict[str, list[Path]] = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        match = _FILE.fullmatch(path.name)
        if match is None:
            raise ConversionError(f"{path}: not a nanotron model tensor file name")
        name = ".".join(path.parent.relative_to(model_dir).parts + (match.group(1),))
        files.setdefault(name, []).append(path)
    return files


def _shard_ref(name: str, paths: list[Path]) -> TensorRef:
    """The whole tensor of a (possibly TP-sharded) nanotron parameter, assembled from its slices metadata."""
    with safe_open(str(paths[0]), framework="pt") as f:
        meta = f.metadata() or {}
        first = f.get_slice("data")
        dtype_name, local_shape = first.get_dtype(), tuple(first.get_shape())
    if "unsharded_shape" in meta:
        shape = _parse_shape(meta["unsharded_shape"], paths[0])
    else:
        if len(paths) > 1:
            raise ConversionError(f"{name}: {len(paths)} files without slices metadata")
        shape = local_shape
    from .safetensors_stream import _torch_dtype

    dtype = _torch_dtype(dtype_name)

    def load() -> torch.Tensor:
        if len(paths) == 1 and "unsharded_shape" not in meta:
            with safe_open(str(paths[0]), framework="pt") as f:
                return f.get_tensor("data")
        full = torch.empty(shape, dtype=dtype)
        filled = torch.zeros(shape[0], dtype=torch.bool)
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                data, file_meta = f.get_tensor("data"), f.metadata() or {}
            for local, global_ in _parse_slices(file_meta["local_global_slices_pairs"]):
                full[global_] = data[local]
                filled[global_[0]] = True
        if not bool(filled.all()):
            raise ConversionError(f"{name}: its shards do not cover rows {(~filled).nonzero().flatten()[:5].tolist()} "
                                  "(a missing shard file?)")
        return full

    return TensorRef(shape, dtype, load)


def _deinterleave(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """nanotron's interleaved RoPE rows (pairs 0,1 | 2,3 | ...) per head -> halves (0,2,4,... | 1,3,5,...)."""
    rest = tuple(rows.shape[1:])
    return rows.reshape(-1, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows.shape)


def _interleave(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    rest = tuple(rows.shape[1:])
    return rows.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows.shape)


def rope_as_nanotron_computes_it(nt: dict) -> tuple[bool, float, list[str]]:
    """(interleaved, base, notes) of the RoPE that nanotron applies to a model_config.json: the fields where the
    config has them; where it lacks them, what every nanotron that wrote no such field computed (module docstring)."""
    notes = []
    if "rope_interleaved" in nt:
        interleaved = bool(nt["rope_interleaved"])
    else:
        interleaved = True
        notes.append("model_config.json has no rope_interleaved: read as interleaved RoPE, which every nanotron "
                     "without that field (0.4 and later, until 2024-09) applies")
    if "rope_theta" in nt:
        theta = float(nt["rope_theta"])
    else:
        theta = DEFAULT_ROPE_THETA
        notes.append(f"model_config.json has no rope_theta: read as {DEFAULT_ROPE_THETA:g}, the base every nanotron "
                     "without that field (0.4 and later, until 2024-05) rotates with")
    return interleaved, theta, notes


def _nanotron_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """megahf's fused QKV -> nanotron's [queries; keys; values], queries and keys interleaved for its RoPE."""
    q, k, v = split_qkv(fused, heads, groups)
    return torch.cat([_interleave(q, head_dim), _interleave(k, head_dim), v])


def read_nanotron(path: str | os.PathLike, overrides: dict | None = None) -> LoadedCheckpoint:
    from ..models.gpt.configuration_megatron_gpt import MegatronGPTConfig

    root = Path(path)
    if not (root / CONFIG_FILE).is_file():
        raise ConversionError(f"{root}: no {CONFIG_FILE} (a nanotron checkpoint folder)")
    nt = json.loads((root / CONFIG_FILE).read_text())
    if not nt.get("is_llama_config", "num_key_value_heads" in nt):
        raise ConversionError(f"{root}: only nanotron's Llama (is_llama_config) converts")
    if nt.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{root}: hidden_act={nt['hidden_act']!r}: megahf's gated MLP is SwiGLU (silu)")
    if nt.get("attention_bias"):
        raise ConversionError(f"{root}: attention_bias={nt['attention_bias']!r}: megahf's nanotron Llama has no "
                              "linear biases")
    interleaved, theta, notes = rope_as_nanotron_computes_it(nt)
    scaling = nt.get("rope_scaling") or None
    if scaling is not None:
        notes.append(NANOTRON_IGNORES_SCALING.format(scaling=scaling))
    files = _tensor_files(root)
    refs = {name: _shard_ref(name, paths) for name, paths in files.items()}
    if EMBEDDING not in refs:
        raise ConversionError(f"{root}: missing {EMBEDDING}")
    side = json.loads((root / SIDE_FILE).read_text()) if (root / SIDE_FILE).is_file() else {}
    def need(key: str):
        if key not in nt:
            raise ConversionError(f"{root / CONFIG_FILE}: no {key} (nanotron writes every field of its LlamaConfig); "
                                  f"add it, or pass --model-overrides with megahf's name for it")
        return nt[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    groups = nt.get("num_key_value_heads") or heads
    rows = refs[EMBEDDING].shape[0]
    fields = dict(vocab_size=side.get("vocab_size", rows), hidden_size=hidden, num_layers=need("num_hidden_layers"),
                  num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=need("intermediate_size"),
                  max_position_embeddings=need("max_position_embeddings"), position_embedding_type="rope",
                  rotary_base=int(theta) if theta.is_integer() else theta, rope_scaling=scaling,
                  normalization="RMSNorm",
                  layernorm_epsilon=nt.get("rms_norm_eps", 1e-6), activation="swiglu", add_bias_linear=False,
                  tie_word_embeddings=bool(nt.get("tie_word_embeddings", False)), hidden_dropout=0.0,
                  attention_dropout=0.0, init_method_std=nt.get("initializer_range", 0.02),
                  bos_token_id=nt.get("bos_token_id"), eos_token_id=nt.get("eos_token_id"))
    try:
        config = MegatronGPTConfig(**{**fields, **(overrides or {})})
    except ValueError as error:
        raise ConversionError(f"{root / CONFIG_FILE}: {error}") from None
    padded, d = config.padded_vocab_size, config.head_dim
    out: dict[str, TensorRef] = {}
    used = set()

    def take(name: str) -> TensorRef:
        if name not in refs:
            raise ConversionError(f"{root}: missing tensor {name} (files under model/{name.replace('.', '/')})")
        used.add(name)
        return refs[name]

    embedding = take(EMBEDDING)
    out["model.embedding.word_embeddings.weight"] = TensorRef((padded, hidden), embedding.dtype,
                                                              lambda: _pad_rows(embedding.load(), padded))
    q_rows, kv_rows = heads * d, groups * d
    for i in range(config.num_layers):
        src, dst = LAYER.format(i=i), f"model.decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        qkv = take(src + "attn.qkv_proj.weight")

        def fused(ref=qkv) -> torch.Tensor:
            q, k, v = ref.load().split([q_rows, kv_rows, kv_rows])
            if interleaved:
                q, k = _deinterleave(q, d), _deinterleave(k, d)
            return fuse_qkv(q, k, v, groups)

        out[dst + "self_attention.linear_qkv.weight"] = TensorRef(qkv.shape, qkv.dtype, fused)
        out[dst + "self_attention.linear_proj.weight"] = take(src + "attn.o_proj.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        gate_up = take(src + "mlp.gate_up_proj.weight")
        half = (gate_up.shape[0] // 2, *gate_up.shape[1:])
        for index, part in enumerate(("gate", "up")):
            out[dst + f"mlp.linear_fc1_{part}.weight"] = TensorRef(
                half, gate_up.dtype, lambda ref=gate_up, index=index: ref.load().chunk(2)[index].clone())
        out[dst + "mlp.linear_fc2.weight"] = take(src + "mlp.down_proj.weight")
    out["model.decoder.final_layernorm.weight"] = take(FINAL_NORM)
    if not config.tie_word_embeddings:
        head = take(LM_HEAD)
        out["output_layer.weight"] = TensorRef((padded, hidden), head.dtype, lambda: _pad_rows(head.load(), padded))
    unknown = sorted(set(refs) - used - {LM_HEAD})
    if unknown:
        raise ConversionError(f"{root}: unknown nanotron tensors {unknown[:5]} (biases? megahf's nanotron Llama has "
                              "none)")
    loaded = LoadedCheckpoint(config, "MegatronGPTForCausalLM", out, layout={"rope_interleaved": interleaved},
                              notes=notes)
    check_shapes(loaded, str(root))
    return loaded


def write_nanotron(loaded: LoadedCheckpoint, dst: Path, show_progress: bool = True) -> list[str]:
    """The nanotron checkpoint folder of a megahf Llama-style GPT; returns notes for the proof."""
    c = loaded.config
    checks = [(c.model_type == "megatron_gpt", "it is not a GPT"), (c.position_embedding_type == "rope", "RoPE"),
              (c.normalization == "RMSNorm", "RMSNorm"), (c.activation == "swiglu", "SwiGLU"),
              (not c.add_bias_linear, "no linear biases")]
    for ok, what in checks:
        if not ok:
            raise ConversionError(f"this model cannot be written as nanotron: nanotron's Llama needs {what}")
    t = loaded.tensors
    heads, groups, d = c.num_attention_heads, c.num_query_groups, c.head_dim
    plan: dict[str, TensorRef] = {EMBEDDING: t["model.embedding.word_embeddings.weight"]}
    for i in range(c.num_layers):
        src, dst_ = f"model.decoder.layers.{i}.", LAYER.format(i=i)
        qkv = t[src + "self_attention.linear_qkv.weight"]
        plan[dst_ + "input_layernorm.weight"] = t[src + "input_layernorm.weight"]
        plan[dst_ + "attn.qkv_proj.weight"] = TensorRef(qkv.shape, qkv.dtype, lambda ref=qkv: _nanotron_qkv(
            ref.load(), heads, groups, d))
        plan[dst_ + "attn.o_proj.weight"] = t[src + "self_attention.linear_proj.weight"]
        plan[dst_ + "post_attention_layernorm.weight"] = t[src + "pre_mlp_layernorm.weight"]
        gate, up = t[src + "mlp.linear_fc1_gate.weight"], t[src + "mlp.linear_fc1_up.weight"]
        plan[dst_ + "mlp.gate_up_proj.weight"] = TensorRef((2 * gate.shape[0], *gate.shape[1:]), gate.dtype,
                                                           lambda g=gate, u=up: torch.cat([g.load(), u.load()]))
        plan[dst_ + "mlp.down_proj.weight"] = t[src + "mlp.linear_fc2.weight"]
    plan[FINAL_NORM] = t["model.decoder.final_layernorm.weight"]
    if not c.tie_word_embeddings:
        plan[LM_HEAD] = t["output_layer.weight"]
    # replicated in nanotron (no rank suffix): the norms; everything else is a TP-sharded parameter
    replicated = {name for name in plan if name.endswith("layernorm.weight") or name == FINAL_NORM}
    dst.mkdir(parents=True, exist_ok=True)
    bar = progress(len(plan), "nanotron", show_progress)
    for name, ref in plan.items():
        parts = name.split(".")
        folder = dst / "model" / Path(*parts[:-1])
        folder.mkdir(parents=True, exist_ok=True)
        if name in replicated:
            write_safetensors(folder / f"model_{parts[-1]}.safetensors", {"data": ref}, metadata={})
        else:
            metadata = {"version": CHECKPOINT_VERSION, "unsharded_shape": str(tuple(ref.shape)),
                        "local_global_slices_pairs": _format_slices(tuple(ref.shape))}
            write_safetensors(folder / f"model_{parts[-1]}_pp-rank-0-of-1_tp-rank-0-of-1.safetensors",
                              {"data": ref}, metadata=metadata)
        bar.update(1)
    bar.close()
    theta = float(c.rotary_base)
    # transformers' legacy rope_scaling dict, as nanotron's Hugging Face converter copies it into this config
    scaling = {k: v for k, v in c.rope_parameters.items() if k != "rope_theta"}
    scaling = None if scaling.get("rope_type") == "default" else scaling
    config = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "hidden_act": "silu",
              "hidden_size": c.hidden_size, "initializer_range": c.init_method_std,
              "intermediate_size": c.ffn_hidden_size, "is_llama_config": True,
              "max_position_embeddings": c.max_position_embeddings, "num_attention_heads": heads,
              "num_hidden_layers": c.num_layers, "attention_bias": False, "num_key_value_heads": groups,
              "pad_token_id": c.pad_token_id, "pretraining_tp": 1, "rms_norm_eps": c.layernorm_epsilon,
              "rope_scaling": scaling, "rope_theta": theta, "rope_interleaved": True,
              "tie_word_embeddings": c.tie_word_embeddings, "use_cache": True, "vocab_size": c.padded_vocab_size}
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (dst / SIDE_FILE).write_text(json.dumps({"vocab_size": c.vocab_size}))
    notes = [] if scaling is None else [NANOTRON_IGNORES_SCALING.format(scaling=scaling)]
    if theta != DEFAULT_ROPE_THETA:
        notes.append(f"rope_theta={theta:g}: nanotron before 2024-05 (0.4, 0.5) ignores rope_theta and rotates with "
                     f"base {DEFAULT_ROPE_THETA:g}; run this checkpoint with a later nanotron")
    return notes


__all__ = ["read_nanotron", "write_nanotron"]
