"""Megatron-Core's `torch_dist` checkpoint format, read and written without Megatron installed.

The layout, as megatron-core 0.16.1 writes it (megatron/core/dist_checkpointing: serialization.py, core.py,
strategies/torch.py, strategies/common.py; checked by saving real Megatron-Core models with its own
`dist_checkpointing.save` on CPU in tests/test_convert_megatron_dist.py):

    CHECKPOINT/latest_checkpointed_iteration.txt
    CHECKPOINT/iter_0001000/ (or release/)
        metadata.json      {"sharded_backend": "torch_dist", "sharded_backend_version": 1, ...}
        common.pt          the non-tensor state (args, checkpoint_version, iteration, ...), a torch pickle
        .metadata          torch.distributed.checkpoint (DCP) metadata: every tensor's global shape and chunks
        __R_N.distcp       the chunks each rank wrote

Tensors are stored whole (global shapes: TP and PP are undone, which is what makes the format reshardable), under the
keys of Megatron-Core's `sharded_state_dict`: the layers of a stack are one tensor with a leading layer axis
(`decoder.layers.self_attention.linear_qkv.weight` [layers, qkv rows, hidden]; per-layer keys `decoder.layers.{i}...`
when the stack is not homogeneous), the norms under Transformer Engine's fused names
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) whatever the layer spec, SwiGLU's fc1 as
[all gate rows; all up rows], and the vocabulary padded as the saving run padded it (Megatron loads it under
another padding: embeddings are `allow_shape_mismatch`). Non-tensor extras (`_extra_state`) are byte records.

Reading goes through megahf's safe DCP reader (no pickle can run code) one parameter at a time; writing is a plain
`torch.distributed.checkpoint.save` of whole tensors, which Megatron-Core's loader reshards to its TP x PP.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .common import ConversionError, LoadedCheckpoint, TensorRef, check_shapes, progress
from .megatron_legacy import TRACKER, _resize_rows, config_from_args, megatron_args, megatron_padded_vocab
from .megatron_names import core_to_megahf, megahf_to_core
from .megatron_pickle import arg, load_megatron_file

BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"
CHECKPOINT_VERSION = 3.0

# torch_dist key (without the layer part) -> core name of the layer's parameter
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
_LAYER_PARAMS = {f"{m}.{k}" for m in ("input_layernorm", "self_attention.linear_qkv", "self_attention.linear_proj",
                                      "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")
                 for k in ("weight", "bias")}
_TOP = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
        "embedding.tokentype_embeddings.weight", "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
        "encoder.final_layernorm.weight", "encoder.final_layernorm.bias", "output_layer.weight", "output_layer.bias",
        "pooler.dense.weight", "pooler.dense.bias", "lm_head.dense.weight", "lm_head.dense.bias",
        "lm_head.layer_norm.weight", "lm_head.layer_norm.bias", "binary_head.weight", "binary_head.bias"}
_STACKED = re.compile(r"(decoder|encoder)\.layers\.(?:(\d+)\.)?(.+)")
_SKIPPED = re.compile(r"(optimizer\.|rng_state|rerun_state|.*_extra_state).*")
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _reader(folder: Path):
    """megahf's safe DCP reader, its metadata allow-list extended by what Megatron-Core's metadata also holds: the
    cached save plans (`planner_data`), made of DCP's own plain data classes."""
    from ..training.safe_checkpoint_reader import _METADATA_GLOBALS, MetadataUnpickler, SafeFileSystemReader

    class MegatronMetadataUnpickler(MetadataUnpickler):
        allowed = _METADATA_GLOBALS | {("torch.distributed.checkpoint.planner", name)
                                       for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}

    class MegatronDistReader(SafeFileSystemReader):
        unpickler = MegatronMetadataUnpickler

    return MegatronDistReader(folder)


def is_dist_checkpoint(folder: Path) -> bool:
    return (folder / BACKEND_FILE).is_file()


def dist_folder(path: str | os.PathLike) -> Path:
    """The folder holding metadata.json: `path` itself or the iteration its tracker file names."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such Megatron checkpoint folder")
    if is_dist_checkpoint(path):
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        folder = path / ("release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else "-")
        if is_dist_checkpoint(folder):
            return folder
        raise ConversionError(f"{tracker} says {text!r} but {folder} holds no {BACKEND_FILE} (a torch_dist "
                              "checkpoint); is it a legacy one? use --from megatron")
    raise ConversionError(f"{path}: neither {BACKEND_FILE} nor {TRACKER}: not a torch_dist checkpoint")


def read_megatron_dist(path: str | os.PathLike, overrides: dict | None = None,
                       trust_pickle: bool = False) -> LoadedCheckpoint:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..training.safe_checkpoint_reader import UnsafePickleError

    folder = dist_folder(path)
    backend = json.loads((folder / BACKEND_FILE).read_text())
    if backend.get("sharded_backend") != "torch_dist":
        raise ConversionError(f"{folder / BACKEND_FILE}: sharded_backend={backend.get('sharded_backend')!r}; megahf "
                              "reads torch_dist (zarr was removed from Megatron-Core)")
    common = load_megatron_file(folder / COMMON_FILE, trust_pickle, mmap=False) if (folder / COMMON_FILE).is_file() \
        else {}
    args = common.get("args") if isinstance(common, dict) else None
    try:
        metadata = _reader(folder).read_metadata()
    except UnsafePickleError as error:
        raise ConversionError(f"{folder}: {error}") from None

    # core name (global layer numbers) -> (DCP key, layer index in the stacked tensor or None, shape)
    entries: dict[str, tuple[str, int | None, tuple]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or _SKIPPED.fullmatch(key):
            continue
        size = tuple(meta.size)
        if key in _TOP:
            entries[key] = (key, None, size)
            continue
        match = _STACKED.fullmatch(key)
        param = _TE_NORMS.get(match.group(3), match.group(3)) if match else None
        if match is None or param not in _LAYER_PARAMS:
            raise ConversionError(f"{folder}: unknown key {key!r} in the torch_dist checkpoint (megahf knows "
                                  "Megatron-Core's GPT and BERT keys)")
        body, number = match.group(1), match.group(2)
        if number is not None:
            entries[f"{body}.layers.{number}.{param}"] = (key, None, size)
        else:
            for layer in range(size[0]):
                entries[f"{body}.layers.{layer}.{param}"] = (key, layer, size[1:])
    family = "bert" if any(k.startswith(("lm_head.", "binary_head.", "encoder.")) for k in entries) else "gpt"
    shapes = {core: shape for core, (_, _, shape) in entries.items()}
    layers = len({int(core.split(".")[2]) for core in entries if ".layers." in core})
    notes: list[str] = []
    config = config_from_args(args, family, shapes, layers, dict(overrides or {}), notes)
    if config.tie_word_embeddings:
        entries.pop("output_layer.weight", None)
    swiglu = getattr(config, "activation", "gelu") == "swiglu"
    dtypes = {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()
              if isinstance(meta, TensorStorageMetadata)}
    reader = _StackedReader(folder)
    tensors: dict[str, TensorRef] = {}
    for core, (key, layer, shape) in sorted(entries.items(), key=lambda item: (item[1][0], item[1][1] or 0)):
        dtype = dtypes[key]
        name = core_to_megahf(core)
        if swiglu and core.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            half = (shape[0] // 2, *shape[1:])
            for index, part in enumerate(("gate", "up")):
                tensors[name.replace("linear_fc1.", f"linear_fc1_{part}.")] = TensorRef(
                    half, dtype, lambda k=key, i=layer, p=index: reader.get(k, i).chunk(2)[p].clone())
            continue
        if core in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
            padded = config.padded_vocab_size
            tensors[name] = TensorRef((padded, *shape[1:]), dtype,
                                      lambda k=key, n=padded: _resize_rows(reader.get(k, None), n))
            continue
        tensors[name] = TensorRef(shape, dtype, lambda k=key, i=layer: reader.get(k, i).clone())
    model_class = "MegatronGPTForCausalLM" if family == "gpt" else "MegatronBertForPreTraining"
    rows = shapes["embedding.word_embeddings.weight"][0]
    if rows != config.padded_vocab_size:
        notes.append(f"vocabulary rows re-padded from Megatron's {rows} to megahf's {config.padded_vocab_size}")
    loaded = LoadedCheckpoint(config, model_class, tensors, notes=notes, layout={
        "folder": folder.name, "iteration": common.get("iteration") if isinstance(common, dict) else None,
        "checkpoint_version": common.get("checkpoint_version") if isinstance(common, dict) else None,
        "tp": arg(args, "tensor_model_parallel_size"), "pp": arg(args, "pipeline_model_parallel_size"),
        "tokenizer_type": arg(args, "tokenizer_type")})
    check_shapes(loaded, str(path))
    return loaded


class _StackedReader:
    """Reads one DCP tensor at a time (whole), keeping the last one: the layers of a stacked parameter are asked
    for one after the other."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key: str | None = None
        self.tensor: torch.Tensor | None = None

    def get(self, key: str, layer: int | None) -> torch.Tensor:
        if key != self.key:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            from ..training.checkpoint import _quiet_single_process

            reader = _reader(self.folder)
            meta = reader.read_metadata().state_dict_metadata[key]
            assert isinstance(meta, TensorStorageMetadata)
            self.tensor = None  # drop the previous one before reading the next
            state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            with _quiet_single_process():
                dcp.load(state, storage_reader=reader)
            self.key, self.tensor = key, state[key]
        return self.tensor if layer is None else self.tensor[layer]


def write_megatron_dist(loaded: LoadedCheckpoint, dst: Path, tp: int = 1, show_progress: bool = True) -> None:
    """A torch_dist `release/` checkpoint Megatron-Core loads (`dist_checkpointing.load`), the vocabulary padded as a
    TP=`tp` run pads it. DCP saves one state dict in one call, so the model is held once in memory here (each layer
    stack assembled from its layers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from ..training.checkpoint import _quiet_single_process

    config = loaded.config
    gpt = config.model_type == "megatron_gpt"
    body = "decoder" if gpt else "encoder"
    padded = megatron_padded_vocab(config.padded_vocab_size, tp)
    folder = dst / "release"
    folder.mkdir(parents=True)
    groups: dict[str, list[tuple[int, str]]] = {}
    state: dict = {}
    for name in loaded.tensors:
        core = megahf_to_core(name)
        match = _STACKED.fullmatch(core)
        if match is None:
            state[core] = name
            continue
        param = match.group(3)
        if ".linear_fc1_gate." in param or ".linear_fc1_up." in param:
            param = param.replace("linear_fc1_gate.", "linear_fc1.").replace("linear_fc1_up.", "linear_fc1.")
        param = next((te for te, local in _TE_NORMS.items() if local == param), param)
        groups.setdefault(f"{body}.layers.{param}", []).append((int(match.group(2)), name))
    bar = progress(len(loaded.tensors), "megatron-dist", show_progress)
    tensors: dict[str, torch.Tensor] = {}
    for core, name in state.items():
        tensor = loaded.tensors[name].load()
        if core in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
            tensor = _resize_rows(tensor, padded)
        tensors[core] = tensor
        bar.update(1)
    for key, members in groups.items():
        per_layer: dict[int, list] = {}
        for layer, name in members:
            per_layer.setdefault(layer, []).append(name)
        stacked = []
        for layer in range(config.num_layers):
            names = sorted(per_layer[layer], key=lambda n: ".linear_fc1_up." in n)  # [gate; up]
            stacked.append(torch.cat([loaded.tensors[n].load() for n in names]) if len(names) > 1
                           else loaded.tensors[names[0]].load())
            bar.update(len(names))
        tensors[key] = torch.stack(stacked)
    # the byte records Megatron-Core's load asks for: each linear layer's extra state (None without FP8), in a
    # one-element list as Megatron-Core stores a sharded object (DCP pickles non-tensor values itself)
    for module in _LINEARS:
        for layer in range(config.num_layers):
            tensors[f"{body}.layers.{module}._extra_state/shard_{layer}_{config.num_layers}"] = [None]
    if not gpt:  # BertModel asks for its output layer's too; GPTModel drops that key (gpt_model.py sharded_state_dict)
        tensors["output_layer._extra_state/shard_0_1"] = [None]
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(folder), planner=DefaultSavePlanner(flatten_state_dict=False))
    bar.close()
    args = megatron_args(config, tp, 1, padded, loaded.layout.get("tokenizer_type"))
    args.ckpt_format = "torch_dist"
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}, folder / COMMON_FILE)
    (folder / BACKEND_FILE).write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))
    (dst / TRACKER).write_text("release")


__all__ = ["dist_folder", "is_dist_checkpoint", "read_megatron_dist", "write_megatron_dist"]
