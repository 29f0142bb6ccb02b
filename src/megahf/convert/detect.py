"""Which checkpoint format a folder holds, from its files alone (nothing is loaded), and the model folders a run can
start from as they are.

    detect_format("runs/gpt/final")      -> "megahf"
    detect_format("Llama-3-8B")          -> "hf-llama"
    read_model_folder("Llama-3-8B")      -> LoadedCheckpoint (converted in memory, tensors read on demand)

`read_model_folder` takes the folders a pretraining or fine-tuning run reads straight (`LOADABLE`: a megahf model
folder, or a transformers GPT-2 / Llama / BERT / MegatronBert folder, converted in memory); a Megatron-LM, Megatron-Core
torch_dist or nanotron checkpoint, or a megahf training checkpoint, is refused with the `megahf convert` command that
makes it a megahf folder (their readers need the whole checkpoint, or pickles, and converting once proves the result).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from .common import ConversionError, LoadedCheckpoint

# config.json's model_type -> the conversion format of the folder
MODEL_TYPES = {"megatron_gpt": "megahf", "megatron_bert": "megahf", "gpt2": "hf-gpt2", "llama": "hf-llama",
               "bert": "hf-bert", "megatron-bert": "hf-megatron-bert"}
LOADABLE = ("megahf", "hf-gpt2", "hf-llama", "hf-bert", "hf-megatron-bert")


def _iteration_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and (p.name.startswith("iter_") or p.name == "release"))


def detect_format(path: str | os.PathLike) -> str:
    """The conversion format of a checkpoint folder (`megahf convert --from` names), or "megahf-checkpoint" for a
    megahf training checkpoint; `ConversionError` naming what was found when it is none of them."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such folder")
    if (path / "megahf_checkpoint.json").is_file():
        return "megahf-checkpoint"
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError):
            raise ConversionError(f"{path}/config.json is not a JSON object with a model_type") from None
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type]
        raise ConversionError(f"{path}: model_type={model_type!r} is not a model megahf reads; megahf reads megahf "
                              "(megatron_gpt, megatron_bert), gpt2, llama, bert and megatron-bert folders")
    if (path / "model_config.json").is_file() and (path / "model").is_dir():
        return "nanotron"
    tracked = (path / "latest_checkpointed_iteration.txt").is_file()
    if tracked or path.name.startswith("iter_") or path.name == "release":
        iterations = _iteration_folders(path) if tracked else [path]
        newest = iterations[-1] if iterations else path
        dist = (newest / "metadata.json").is_file() or (newest / ".metadata").is_file()
        return "megatron-dist" if dist else "megatron"
    raise ConversionError(f"{path}: no config.json (a model folder), megahf_checkpoint.json (a megahf training "
                          "checkpoint), latest_checkpointed_iteration.txt (Megatron-LM) or model_config.json "
                          "(nanotron) in it")


def convert_first(path: str | os.PathLike, fmt: str, key: str) -> ConversionError:
    """The error for a checkpoint that must be converted before a run reads it, with the command that does it."""
    source = "megahf" if fmt == "megahf-checkpoint" else fmt
    target = f"{str(path).rstrip('/')}-megahf"
    command = f"megahf convert --from {source} --to megahf {shlex.quote(str(path))} {shlex.quote(target)}"
    what = {"megahf-checkpoint": "a megahf training checkpoint (to resume its run, use resume: instead)",
            "megatron": "a Megatron-LM checkpoint", "megatron-dist": "a Megatron-Core torch_dist checkpoint",
            "nanotron": "a nanotron checkpoint"}[fmt]
    return ConversionError(f"recipe key {key}={str(path)!r} is {what}: convert it first ({command}"
                           f"{' --trust-pickle' if fmt == 'megatron' else ''}), then give {target}")


def read_model_folder(path: str | os.PathLike, key: str = "model") -> LoadedCheckpoint:
    """A model folder a run starts from, as megahf tensors read on demand (`key`: the recipe key naming it, for the
    errors)."""
    fmt = detect_format(path)
    if fmt not in LOADABLE:
        raise convert_first(path, fmt, key)
    from .api import read_checkpoint

    return read_checkpoint(fmt, path)


__all__ = ["LOADABLE", "MODEL_TYPES", "convert_first", "detect_format", "read_model_folder"]
