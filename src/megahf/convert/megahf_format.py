"""megahf's own formats: a model folder (config.json + safetensors, what `save_pretrained` writes) and a training
checkpoint (`checkpoints/step_N/`, torch.distributed.checkpoint, any TP/FSDP layout: DCP stores every tensor's global
shape and reassembles it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .common import ConversionError, LoadedCheckpoint, TensorRef, check_shapes, progress
from .safetensors_stream import read_safetensors, write_safetensors

WEIGHTS = "model.safetensors"
HEADS = {"megatron_gpt": "MegatronGPTForCausalLM", "megatron_bert": "MegatronBertForPreTraining"}


def _config_class(model_type: str):
    from ..models.bert.configuration_megatron_bert import MegatronBertConfig
    from ..models.gpt.configuration_megatron_gpt import MegatronGPTConfig

    classes = {"megatron_gpt": MegatronGPTConfig, "megatron_bert": MegatronBertConfig}
    if model_type not in classes:
        raise ConversionError(f"model_type={model_type!r} is not a megahf model (megatron_gpt or megatron_bert)")
    return classes[model_type]


def _apply_overrides(config_dict: dict, overrides: dict):
    config_class = _config_class(config_dict.get("model_type"))
    known = set(config_class.__annotations__) | set(config_class.attribute_map)
    for key in overrides:
        if key not in known:
            raise ConversionError(f"--model-overrides {key}: not a field of {config_class.__name__}")
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    return config_class(**{**fields, **overrides})


def is_training_checkpoint(path: Path) -> bool:
    return (path / "megahf_checkpoint.json").is_file()


def read_megahf(path: str | os.PathLike, overrides: dict | None = None) -> LoadedCheckpoint:
    """A megahf model folder, or a megahf training checkpoint `checkpoints/step_N/`."""
    path = Path(path)
    if is_training_checkpoint(path):
        return read_training_checkpoint(path, overrides)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json (a megahf model folder) nor megahf_checkpoint.json (a megahf "
                              "training checkpoint, checkpoints/step_N/)")
    config_dict = json.loads(config_file.read_text())
    config = _apply_overrides(config_dict, overrides or {})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no .safetensors weights (megahf reads safetensors only, never pickles)")
    tensors = read_safetensors(files)
    architectures = config_dict.get("architectures") or [HEADS[config.model_type]]
    loaded = LoadedCheckpoint(config, architectures[0], tensors, layout={"folder": path.name})
    _drop_tied(loaded)
    check_shapes(loaded, str(path))
    return loaded


def _drop_tied(loaded: LoadedCheckpoint) -> None:
    if loaded.config.tie_word_embeddings:
        loaded.tensors.pop("output_layer.weight", None)


def read_training_checkpoint(path: Path, overrides: dict | None = None) -> LoadedCheckpoint:
    """The model of a megahf training checkpoint: DCP metadata gives each tensor's global shape; the tensors are
    read through megahf's safe DCP reader (nothing in the checkpoint can run code)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..training.checkpoint import MODEL_OPTIM, _quiet_single_process, checkpoint_problem, read_metadata
    from ..training.safe_checkpoint_reader import SafeFileSystemReader, UnsafePickleError

    problem = checkpoint_problem(path)
    if problem:
        raise ConversionError(f"{path}: unusable training checkpoint ({problem})")
    marker = read_metadata(path)
    if "model_config" not in marker:
        raise ConversionError(f"{path}: its megahf_checkpoint.json has no model_config (written by an older megahf)")
    config = _apply_overrides(marker["model_config"], overrides or {})
    try:
        metadata = SafeFileSystemReader(path / MODEL_OPTIM).read_metadata()
    except UnsafePickleError as error:
        raise ConversionError(f"{path}: {error}") from None
    shapes = {fqn[len("model."):]: meta for fqn, meta in metadata.state_dict_metadata.items()
              if fqn.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    model_class = HEADS[config.model_type]
    cache: dict = {}

    def load_all() -> dict:
        # DCP reads whole requests; one call for every model tensor (a training checkpoint's model fits in memory
        # where it was trained), the optimizer state is never read.
        if not cache:
            state = {"model": {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                               for name, meta in shapes.items()}}
            with _quiet_single_process():
                dcp.load(state, storage_reader=SafeFileSystemReader(path / MODEL_OPTIM))
            cache.update(state["model"])
        return cache

    tensors = {name: TensorRef(tuple(meta.size), meta.properties.dtype,
                               (lambda n=name: load_all()[n]))
               for name, meta in shapes.items()}
    loaded = LoadedCheckpoint(config, model_class, tensors, layout={"training_step": marker.get("step"),
                                                                    "tp": marker.get("tensor_parallel_size"),
                                                                    "fsdp": marker.get("fsdp_size")})
    _drop_tied(loaded)
    check_shapes(loaded, str(path))
    return loaded


def write_megahf(loaded: LoadedCheckpoint, dst: Path, show_progress: bool = True) -> None:
    """A megahf model folder: config.json (architectures = the head class) and model.safetensors, streamed."""
    dst.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    config.architectures = [loaded.model_class]
    config.save_pretrained(dst)
    bar = progress(len(loaded.tensors), "megahf", show_progress)
    write_safetensors(dst / WEIGHTS, loaded.tensors, on_tensor=lambda _: bar.update(1))
    bar.close()


__all__ = ["read_megahf", "read_training_checkpoint", "write_megahf"]
