"""Megatron-LM's legacy checkpoint format (`--ckpt-format torch`), read and written without Megatron installed.

    CHECKPOINT/latest_checkpointed_iteration.txt          "1000" or "release"
    CHECKPOINT/iter_0001000/ (or release/)
        mp_rank_{tp:02d}/model_optim_rng.pt               pipeline-parallel size 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt      pipeline-parallel size > 1

Each file is a pickle of {"model": state dict of this rank's slice, "args": the training arguments,
"checkpoint_version": 0 | 1.0 | 2.0 | 3.0, "iteration", optimizer, RNG}. Within a pipeline stage the layers are
numbered from 0. Tensor-parallel slices follow Megatron's rules (`megatron_names.tp_rule`): column-parallel layers
split their output rows (QKV by query groups, each rank's rows laid out [q heads of the group; k; v]), row-parallel
layers their input columns, SwiGLU's fused fc1 holds [gate; up] of the rank's channels, and the word embeddings (and
an untied output layer) the rows of a vocabulary padded to a multiple of 128 x TP. megahf pads to 128 alone, so rows
are cut (or zero-padded) on the way.

QKV row order by checkpoint_version, per rank (np heads, hn head size): 0: [3, np, hn]; 1.0: [np, hn, 3];
2.0 and later: [np, 3, hn] (groups for GQA), Megatron-Core's.

Written checkpoints are `release/` checkpoints (Megatron-LM then loads the weights alone: no optimizer, no RNG, and
the iteration restarts at 0), checkpoint_version 3.0, with Megatron-Core names (local spec), Transformer Engine's
fused-norm names (`names="te"`) or the legacy names (`names="legacy"`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .common import ConversionError, LoadedCheckpoint, TensorRef, check_shapes, progress
from .megatron_names import (core_to_legacy, core_to_megahf, core_to_te, family_of, flatten, layer_of,
                             megahf_to_core, naming_of, to_core_name, tp_rule, unflatten, TIED_HEAD_COPY)
from .megatron_pickle import arg, load_megatron_file
from .megatron_rope import rope_args, rope_parameters_from_args

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
_SHARD_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
MEGATRON_VOCAB_MULTIPLE = 128  # Megatron's default --make-vocab-size-divisible-by, multiplied by TP


# ---------------------------------------------------------------------------------------------------- finding files


def iteration_dir(path: str | os.PathLike) -> Path:
    """The folder holding the mp_rank_* shards: `path` itself, or the iteration the tracker file names."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such Megatron checkpoint folder")
    if any(_SHARD_DIR.fullmatch(p.name) for p in path.iterdir()):
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        raise ConversionError(f"{path}: neither {TRACKER} nor mp_rank_* folders; pass the checkpoint folder "
                              "(holding the tracker file) or an iter_XXXXXXX/ or release/ folder")
    text = tracker.read_text().strip()
    folder = path / ("release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else "")
    if not text or not folder.is_dir():
        raise ConversionError(f"{tracker} says {text!r} but {folder.name or '(nothing)'} is not a folder there")
    return folder


def shard_files(folder: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> model file, checked to be a full TP x PP grid."""
    shards = {}
    for child in sorted(folder.iterdir()):
        match = _SHARD_DIR.fullmatch(child.name)
        if match is None:
            if child.name.startswith("mp_rank_"):
                raise ConversionError(f"{child}: expert-parallel shards (mp_rank_XX_YYY_ZZZ) are not supported")
            continue
        tp, pp = int(match.group(1)), int(match.group(2) or 0)
        file = child / MODEL_FILE
        if not file.is_file():
            raise ConversionError(f"missing shard: {file} does not exist (an incomplete copy of the checkpoint?)")
        shards[(tp, pp)] = file
    if not shards:
        hint = " (it holds metadata.json: a torch_dist checkpoint, use --from megatron-dist)" \
            if (folder / "metadata.json").is_file() else ""
        raise ConversionError(f"{folder}: no mp_rank_* shards{hint}")
    tp_size = max(t for t, _ in shards) + 1
    pp_size = max(p for _, p in shards) + 1
    for t in range(tp_size):
        for p in range(pp_size):
            if (t, p) not in shards:
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp_size > 1 else "")
                raise ConversionError(f"missing shard: {folder / name / MODEL_FILE} (the checkpoint has "
                                      f"TP={tp_size} x PP={pp_size} shards otherwise)")
    return shards


# ---------------------------------------------------------------------------------------------------- config


def _override(fields: dict, overrides: dict, config_class) -> dict:
    known = set(getattr(config_class, "__annotations__", {})) | set(config_class.attribute_map)
    for key in overrides:
        if key not in known:
            raise ConversionError(f"--model-overrides {key}: not a field of {config_class.__name__} "
                                  f"(fields: {', '.join(sorted(getattr(config_class, '__annotations__', {})))})")
    return {**fields, **overrides}


def config_from_args(args, family: str, shapes: dict[str, tuple], layers: int, overrides: dict, notes: list):
    """The megahf config of a Megatron checkpoint: its stored args, checked, then `overrides` on top."""
    from ..models.bert.configuration_megatron_bert import MegatronBertConfig
    from ..models.gpt.configuration_megatron_gpt import MegatronGPTConfig

    def refuse(key, value, why):
        raise ConversionError(f"the checkpoint's args say {key}={value!r}: {why}")

    embedding = shapes.get("embedding.word_embeddings.weight")
    hidden = arg(args, "hidden_size") or (embedding[1] if embedding else None)
    heads = arg(args, "num_attention_heads")
    if heads is None and "num_attention_heads" not in overrides:
        raise ConversionError("the checkpoint stores no args with num_attention_heads: pass it with "
                              "--model-overrides num_attention_heads=N (and any other field the args lack)")
    kv_channels = arg(args, "kv_channels")
    if kv_channels and heads and hidden and kv_channels * heads != hidden and "hidden_size" not in overrides:
        refuse("kv_channels", kv_channels, f"megahf's head size is hidden_size / heads = {hidden // heads}")
    if arg(args, "apply_layernorm_1p"):
        refuse("apply_layernorm_1p", True, "zero-centred norm weights are not supported")
    if arg(args, "apply_residual_connection_post_layernorm"):
        refuse("apply_residual_connection_post_layernorm", True, "megahf's Megatron models are pre-LayerNorm")
    rows = embedding[0] if embedding else None
    padded = arg(args, "padded_vocab_size") or rows
    vocab = arg(args, "vocab_size")
    if vocab is None and "vocab_size" not in overrides:
        vocab = padded
        notes.append(f"the args do not store the tokenizer's vocabulary size: every one of the {padded} embedding "
                     "rows is kept as a token; pass --model-overrides vocab_size=N to drop Megatron's padding rows")
    fields = {
        "vocab_size": vocab, "hidden_size": hidden, "num_layers": arg(args, "num_layers") or layers,
        "num_attention_heads": heads, "ffn_hidden_size": arg(args, "ffn_hidden_size"),
        "max_position_embeddings": arg(args, "max_position_embeddings") or arg(args, "seq_length"),
        "layernorm_epsilon": arg(args, "norm_epsilon") or arg(args, "layernorm_epsilon") or 1e-5,
        "init_method_std": arg(args, "init_method_std", 0.02),
        "hidden_dropout": arg(args, "hidden_dropout", 0.1), "attention_dropout": arg(args, "attention_dropout", 0.1),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if family == "bert":
        tokentypes = shapes.get("embedding.tokentype_embeddings.weight")
        fields.update(type_vocab_size=tokentypes[0] if tokentypes else 2, layernorm_order="pre",
                      add_binary_head="binary_head.weight" in shapes)
        for key in ("swiglu", "group_query_attention", "untie_embeddings_and_output_weights"):
            if arg(args, key):
                refuse(key, True, "Megatron's BERT in megahf has GeLU, multi-head attention and tied embeddings")
        return MegatronBertConfig(**_override(fields, overrides, MegatronBertConfig))

    position = arg(args, "position_embedding_type")
    if position is None:
        position = "rope" if arg(args, "use_rotary_position_embeddings") else "learned_absolute"
    if position not in ("learned_absolute", "rope", "yarn"):
        refuse("position_embedding_type", position, "megahf supports learned_absolute, rope and yarn")
    rope = None
    if position != "learned_absolute":
        rope = rope_parameters_from_args(args, position, notes)
        if arg(args, "rotary_percent", 1.0) != 1.0:
            refuse("rotary_percent", arg(args, "rotary_percent"), "megahf rotates the whole head (1.0)")
        if arg(args, "rotary_interleaved", False):
            refuse("rotary_interleaved", True, "megahf's RoPE rotates halves (Megatron-Core's default)")
    for key in ("squared_relu", "onnx_safe"):
        if arg(args, key):
            refuse(key, True, "megahf's MLP is GeLU (exact or --openai-gelu's tanh approximation) or SwiGLU")
    add_bias = arg(args, "add_bias_linear", True)
    if arg(args, "add_qkv_bias", False) and not add_bias:
        refuse("add_qkv_bias", True, "a QKV bias without the other biases is not supported")
    groups = arg(args, "num_query_groups") if arg(args, "group_query_attention") else None
    fields.update(
        num_query_groups=groups, position_embedding_type="learned_absolute" if rope is None else "rope",
        rope_parameters=rope,
        normalization=arg(args, "normalization", "LayerNorm"),
        activation="swiglu" if arg(args, "swiglu") else "gelu_tanh" if arg(args, "openai_gelu") else "gelu",
        add_bias_linear=add_bias,
        tie_word_embeddings=not arg(args, "untie_embeddings_and_output_weights", False),
    )
    fields = {k: v for k, v in fields.items() if v is not None}
    return MegatronGPTConfig(**_override(fields, overrides, MegatronGPTConfig))


# ---------------------------------------------------------------------------------------------------- reading


def _fix_qkv_order(tensor: torch.Tensor, version: float, heads_per_rank: int) -> torch.Tensor:
    """A rank's QKV rows in Megatron-Core's order [heads, 3, head size] from checkpoint_version 0 / 1.0's."""
    if version >= 2.0:
        return tensor
    rest = tuple(tensor.shape[1:])
    if version == 0:  # [3, np, hn]
        return tensor.view(3, heads_per_rank, -1, *rest).transpose(0, 1).reshape(tensor.shape)
    return tensor.view(heads_per_rank, -1, 3, *rest).transpose(1, 2).reshape(tensor.shape)  # 1.0: [np, hn, 3]


def read_megatron(path: str | os.PathLike, overrides: dict | None = None, trust_pickle: bool = False
                  ) -> LoadedCheckpoint:
    """A legacy Megatron-LM checkpoint of any TP x PP as megahf tensors (each merged from its slices when read)."""
    overrides = dict(overrides or {})
    folder = iteration_dir(path)
    shards = shard_files(folder)
    tp_size = max(t for t, _ in shards) + 1
    pp_size = max(p for _, p in shards) + 1
    states, first = {}, None
    for (t, p), file in shards.items():
        loaded = load_megatron_file(file, trust_pickle)
        if not isinstance(loaded, dict) or "model" not in loaded:
            keys = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
            if isinstance(loaded, dict) and "model0" in loaded:
                raise ConversionError(f"{file}: a virtual-pipeline checkpoint (model0, model1, ...) is not supported")
            raise ConversionError(f"{file}: not a Megatron model file (expected a dict with 'model', got {keys})")
        states[(t, p)] = flatten(loaded["model"])
        if first is None:
            first = loaded
    args = first.get("args")
    version = float(first.get("checkpoint_version", 0) or 0)
    stored_tp, stored_pp = arg(args, "tensor_model_parallel_size"), arg(args, "pipeline_model_parallel_size")
    if stored_tp not in (None, tp_size) or stored_pp not in (None, pp_size):
        raise ConversionError(f"{folder}: the args say TP={stored_tp} x PP={stored_pp} but the folder holds "
                              f"TP={tp_size} x PP={pp_size} shards (a missing or extra shard?)")
    all_keys = {k for state in states.values() for k in state}
    family = family_of(all_keys)
    naming = naming_of(all_keys)

    # core name (global layer numbers) -> per-TP-rank tensors; layer offsets from the layers each stage holds
    pieces: dict[str, list] = {}
    offset, notes = 0, []
    for p in range(pp_size):
        local_layers = set()
        for t in range(tp_size):
            for key, tensor in states[(t, p)].items():
                if not torch.is_tensor(tensor):
                    if tensor is None or key.endswith("_extra_state"):
                        continue  # Transformer Engine's / Megatron-Core's extra state: nothing megahf needs
                    raise ConversionError(f"{shards[(t, p)]}: {key} is a {type(tensor).__name__}, not a tensor")
                try:
                    core = to_core_name(key, family)
                except ConversionError as error:
                    raise ConversionError(f"{shards[(t, p)]}: {error}") from None
                if core is None:
                    continue
                if layer := layer_of(core):
                    local_layers.add(layer[0])
                    body = core.split(".", 1)[0]
                    core = f"{body}.layers.{layer[0] + offset}.{layer[1]}"
                slot = pieces.setdefault(core, [None] * tp_size)
                slot[t] = tensor
        if local_layers != set(range(len(local_layers))):
            raise ConversionError(f"pipeline stage {p}: its layers are numbered {sorted(local_layers)}, expected "
                                  "0..N-1 within each stage")
        offset += len(local_layers)
    for core, slot in pieces.items():
        missing = [t for t, tensor in enumerate(slot) if tensor is None]
        if missing:
            raise ConversionError(f"{core}: missing on tensor-parallel rank(s) {missing} of {tp_size}")

    shapes = {core: _merged_shape(core, slot) for core, slot in pieces.items()}
    config = config_from_args(args, family, shapes, offset, overrides, notes)
    if config.num_layers != offset:
        raise ConversionError(f"the config has num_layers={config.num_layers} but the shards hold {offset} layers")
    swiglu = getattr(config, "activation", "gelu") == "swiglu"
    for key in ("num_attention_heads", "num_query_groups"):
        if getattr(config, key) % tp_size:
            raise ConversionError(f"{key}={getattr(config, key)} is not divisible by the checkpoint's TP={tp_size}: "
                                  "the config does not fit these shards; fix it with --model-overrides")
    heads_per_rank = config.num_attention_heads // tp_size
    if version < 2.0 and config.num_query_groups != config.num_attention_heads:
        raise ConversionError(f"checkpoint_version {version} predates grouped-query attention")

    tied = config.tie_word_embeddings
    if TIED_HEAD_COPY in pieces:
        pieces.pop(TIED_HEAD_COPY)
    if tied and "output_layer.weight" in pieces:
        pieces.pop("output_layer.weight")  # the last stage's copy of the tied embedding

    tensors: dict[str, TensorRef] = {}
    for core, slot in pieces.items():
        rule = tp_rule(core, swiglu)
        if rule == "gate_up":
            for index, part in enumerate(("gate", "up")):
                name = core_to_megahf(core).replace("mlp.linear_fc1.", f"mlp.linear_fc1_{part}.")
                tensors[name] = _merged_ref(slot, rule, index=index)
            continue
        if core.endswith("self_attention.linear_qkv.weight") or core.endswith("self_attention.linear_qkv.bias"):
            ref = _merged_ref(slot, rule, fix=lambda x: _fix_qkv_order(x, version, heads_per_rank))
        elif rule == "vocab":
            ref = _merged_ref(slot, rule, rows=config.padded_vocab_size)
        else:
            ref = _merged_ref(slot, rule)
        tensors[core_to_megahf(core)] = ref
    model_class = "MegatronGPTForCausalLM" if family == "gpt" else "MegatronBertForPreTraining"
    rows = shapes["embedding.word_embeddings.weight"][0]
    if rows != config.padded_vocab_size:
        notes.append(f"vocabulary rows re-padded from Megatron's {rows} to megahf's {config.padded_vocab_size}")
    loaded = LoadedCheckpoint(config, model_class, tensors, notes=notes, layout={
        "tp": tp_size, "pp": pp_size, "names": naming, "checkpoint_version": version,
        "iteration": first.get("iteration"), "folder": folder.name, "tokenizer_type": arg(args, "tokenizer_type")})
    check_shapes(loaded, str(path))
    return loaded


def _merged_shape(core: str, slot: list) -> tuple:
    shape = list(slot[0].shape)
    if core in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias") or (
            layer_of(core) and layer_of(core)[1].startswith(("self_attention.linear_qkv.", "mlp.linear_fc1."))):
        shape[0] = sum(t.shape[0] for t in slot)
    return tuple(shape)


def _merged_ref(slot: list, rule: str, index: int | None = None, rows: int | None = None,
                fix: Callable | None = None) -> TensorRef:
    """A TensorRef that concatenates the TP slices by `rule` when read."""
    first = slot[0]
    shape = list(first.shape)
    if rule in ("col", "vocab"):
        shape[0] = sum(t.shape[0] for t in slot)
    elif rule == "row":
        shape[1] = sum(t.shape[1] for t in slot)
    elif rule == "gate_up":
        shape[0] = sum(t.shape[0] for t in slot) // 2
    if rows is not None:
        shape[0] = rows

    def load() -> torch.Tensor:
        parts = [fix(t) for t in slot] if fix is not None else list(slot)
        if rule == "rep":
            return parts[0].clone()
        if rule == "row":
            return torch.cat(parts, dim=1)
        if rule == "gate_up":
            return torch.cat([part.chunk(2, dim=0)[index] for part in parts], dim=0)
        if rows is not None:  # cut the padding rows before concatenating: one allocation, not two
            kept, left = [], rows
            for part in parts:
                kept.append(part[:left])
                left -= kept[-1].shape[0]
            merged = torch.cat(kept, dim=0)
            return _resize_rows(merged, rows) if left > 0 else merged
        return torch.cat(parts, dim=0)

    return TensorRef(tuple(shape), first.dtype, load)


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor[:rows].clone()
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


# ---------------------------------------------------------------------------------------------------- writing


def megatron_padded_vocab(vocab_size: int, tp: int, multiple: int = MEGATRON_VOCAB_MULTIPLE) -> int:
    """Megatron's padded vocabulary: a multiple of make_vocab_size_divisible_by x TP."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def check_layout(config, tp: int, pp: int) -> None:
    """Refuse, before anything is read or written, a TP x PP that does not divide the model."""
    if not isinstance(tp, int) or tp < 1 or not isinstance(pp, int) or pp < 1:
        raise ConversionError(f"--tp {tp} --pp {pp}: both must be positive integers")
    if getattr(config, "rope_parameters", None):
        rope_args(config)  # a RoPE Megatron-Core cannot compute is refused here
    checks = [("num_attention_heads", config.num_attention_heads, tp),
              ("num_query_groups", config.num_query_groups, tp),
              ("ffn_hidden_size", config.ffn_hidden_size, tp), ("num_layers", config.num_layers, pp)]
    for key, value, size in checks:
        if value % size:
            flag = "--tp" if size == tp and key != "num_layers" else "--pp"
            raise ConversionError(f"{key}={value} is not divisible by {flag} {size}: pick a {flag} that divides it")


# Megatron-LM's tokenizer names for megahf's shipped tokenizers (GPT-2 BPE, BERT uncased WordPiece)
DEFAULT_TOKENIZER_TYPE = {"megatron_gpt": "GPT2BPETokenizer", "megatron_bert": "BertWordPieceLowerCase"}


def megatron_args(config, tp: int, pp: int, padded: int, tokenizer_type: str | None = None) -> argparse.Namespace:
    """The training arguments Megatron-LM reads back: with --use-checkpoint-args (its own names), and, resuming
    without --finetune, every field its `check_checkpoint_args` reads without a default (megatron/training/
    checkpointing.py): the model's shape, the vocabulary padding, `tokenizer_type` (the source checkpoint's, else
    that of megahf's tokenizer for the family), the parallel sizes, `data_parallel_random_init`."""
    gpt = config.model_type == "megatron_gpt"
    fields = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        padded_vocab_size=padded, vocab_size=config.vocab_size,
        make_vocab_size_divisible_by=MEGATRON_VOCAB_MULTIPLE, norm_epsilon=config.layernorm_epsilon,
        layernorm_epsilon=config.layernorm_epsilon, init_method_std=config.init_method_std,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, ckpt_format="torch",
        normalization=config.normalization, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tokenizer_type=tokenizer_type or DEFAULT_TOKENIZER_TYPE[config.model_type], data_parallel_random_init=False,
    )
    if gpt:
        fields.update(
            group_query_attention=config.num_query_groups != config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            position_embedding_type=config.position_embedding_type, use_rotary_position_embeddings=False,
            add_position_embedding=config.position_embedding_type == "learned_absolute",
            swiglu=config.activation == "swiglu", openai_gelu=config.activation == "gelu_tanh",
            add_bias_linear=config.add_bias_linear,
            add_qkv_bias=config.add_bias_linear,
        )
        if config.position_embedding_type == "rope":
            fields.update(rope_args(config))
    else:
        fields.update(bert_binary_head=config.add_binary_head, num_tokentypes=config.type_vocab_size,
                      add_bias_linear=True, swiglu=False, group_query_attention=False,
                      num_query_groups=config.num_attention_heads, position_embedding_type="learned_absolute")
    return argparse.Namespace(**fields)


def _slice(tensor: torch.Tensor, rule: str, rank: int, tp: int) -> torch.Tensor:
    if rule == "rep":
        return tensor.clone()
    dim = 1 if rule == "row" else 0
    return tensor.chunk(tp, dim=dim)[rank].clone()  # clone: torch.save would store the whole tensor behind a view


def write_megatron(loaded: LoadedCheckpoint, dst: Path, tp: int = 1, pp: int = 1, names: str = "core",
                   show_progress: bool = True) -> None:
    """Write `loaded` as a legacy Megatron-LM `release/` checkpoint at TP x PP into the (new) folder `dst`. One
    pipeline stage is held in memory at a time (all its TP slices), each source tensor read once (tied embeddings
    twice when PP > 1: Megatron keeps a copy on the last stage)."""
    if names not in NAMINGS:
        raise ConversionError(f"--megatron-names {names!r}: use one of {', '.join(NAMINGS)}")
    config = loaded.config
    check_layout(config, tp, pp)
    gpt = config.model_type == "megatron_gpt"
    family = "gpt" if gpt else "bert"
    swiglu = gpt and config.activation == "swiglu"
    padded = megatron_padded_vocab(config.padded_vocab_size, tp)
    per_stage = config.num_layers // pp
    folder = dst / "release"
    folder.mkdir(parents=True)
    args = megatron_args(config, tp, pp, padded, loaded.layout.get("tokenizer_type"))

    def stage_and_local(core: str) -> tuple[int, str]:
        layer = layer_of(core)
        if layer is not None:
            stage = layer[0] // per_stage
            return stage, f"{core.split('.', 1)[0]}.layers.{layer[0] - stage * per_stage}.{layer[1]}"
        if core.startswith("embedding."):
            return 0, core
        return pp - 1, core  # final norm, output layer, pooler and heads: Megatron's post-process stage

    by_stage: dict[int, list[tuple[str, str]]] = {stage: [] for stage in range(pp)}
    for name in loaded.tensors:
        stage, local = stage_and_local(megahf_to_core(name))
        by_stage[stage].append((name, local))
    bar = progress(len(loaded.tensors), "megatron", show_progress)
    for stage in range(pp):
        shards: list[dict] = [{} for _ in range(tp)]
        gates: dict[str, torch.Tensor] = {}
        for name, local in by_stage[stage]:
            tensor = loaded.tensors[name].load()
            bar.update(1)
            if ".mlp.linear_fc1_gate." in local:
                gates[local.replace("linear_fc1_gate.", "linear_fc1.")] = tensor
                continue
            if ".mlp.linear_fc1_up." in local:
                fused = local.replace("linear_fc1_up.", "linear_fc1.")
                gate = gates.pop(fused)
                for t in range(tp):  # each rank: [its gate rows; its up rows]
                    shards[t][fused] = torch.cat([gate.chunk(tp)[t], tensor.chunk(tp)[t]]).clone()
                continue
            rule = tp_rule(local, swiglu)
            if rule == "vocab":
                tensor = _resize_rows(tensor, padded)
            for t in range(tp):
                shards[t][local] = _slice(tensor, rule, t, tp)
        if config.tie_word_embeddings and pp > 1 and stage == pp - 1:
            embedding = _resize_rows(loaded.tensors["model.embedding.word_embeddings.weight"].load(), padded)
            for t in range(tp):
                shards[t]["output_layer.weight"] = _slice(embedding, "vocab", t, tp)
        if gates:
            raise ConversionError(f"SwiGLU gate without its up projection: {sorted(gates)[:3]}")
        for t in range(tp):
            if names != "legacy":
                _add_extra_state(shards[t], last_stage=stage == pp - 1)
            model = _named(shards[t], names, family, config.tie_word_embeddings)
            shard_dir = folder / (f"mp_rank_{t:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            shard_dir.mkdir()
            torch.save({"model": model, "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
                       shard_dir / MODEL_FILE)
    bar.close()
    (dst / TRACKER).write_text("release")


NAMINGS = ("core", "te", "legacy")
# Megatron-Core's parallel linear layers carry an `_extra_state` entry (None without FP8); a strict load_state_dict
# expects it
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _add_extra_state(state: dict, last_stage: bool) -> None:
    modules = {key.rsplit(".", 1)[0] for key in state}
    for module in sorted(modules):
        if module.endswith(_LINEARS):
            state[f"{module}._extra_state"] = None
    if last_stage:
        state["output_layer._extra_state"] = None
CHECKPOINT_VERSION = 3.0


def _named(state: dict, names: str, family: str, tied: bool) -> dict:
    """A shard's state dict in the chosen naming (Megatron-Core local spec, Transformer Engine, or legacy)."""
    if names == "core":
        return state
    if names == "te":
        return {core_to_te(key): value for key, value in state.items()}
    flat = {}
    for key, value in state.items():
        if key == "output_layer.weight" and tied:
            flat["word_embeddings_for_head.weight"] = value  # legacy name of the last stage's tied copy
        else:
            flat[core_to_legacy(key, family)] = value
    return unflatten(flat)


__all__ = ["check_layout", "iteration_dir", "megatron_args", "megatron_padded_vocab", "read_megatron",
           "shard_files", "write_megatron"]
