"""What a folder given to `megahf push` / `megahf card` holds, read once and checked before anything is staged.

FOLDER is one of:
    a run folder       FOLDER/final/ is the model (or peft adapter); beside it, what the run wrote: metrics.json
                       (`megahf pretrain`), results.json + results.md (`megahf finetune`), loss.png, recipe.yaml
    a model folder     FOLDER/config.json and safetensors weights (a run's final/, a converted model)
    an adapter folder  FOLDER/adapter_config.json (peft), e.g. a LoRA run's final/

In any of them the card also reads, when present:
    FOLDER/eval/*.json          `megahf evaluate lambada|wikitext --output-json FOLDER/eval/NAME.json`
    FOLDER/conversion.json      the conversion proof of a converted model (also looked for in the model folder):
                                {"source": ..., "source_format": ..., "max_abs_logit_diff": ...,
                                 "mean_abs_logit_diff": ..., "tolerance": ..., "round_trip": true|false|"exact", ...}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MegahfError
from .remote_code import FAMILIES, Family

RUN_FILES = ("metrics.json", "results.json", "results.md", "loss.png", "recipe.yaml", "conversion.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(MegahfError, ValueError):
    """A folder that cannot be published or carded, a repo id that cannot be, or a push that failed for good."""


@dataclass
class PublishSource:
    folder: Path
    kind: str  # "run", "model" or "adapter"
    model_dir: Path
    config: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # path in repo -> evaluate's JSON
    conversion: dict[str, Any] | None = None
    extras: dict[str, Path] = field(default_factory=dict)  # path in repo -> local file, besides the model's

    @property
    def family(self) -> Family | None:
        return FAMILIES.get((self.config or {}).get("model_type"))

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def loss_png(self) -> str | None:
        return "loss.png" if "loss.png" in self.extras else None


def read_folder(folder: str | Path) -> PublishSource:
    """Find the model in `folder` and read every file the card uses; raise HubError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; pass a run's output_dir (with final/), a model folder "
                       "(config.json + *.safetensors) or a peft adapter folder (adapter_config.json)")
    final = folder / "final"
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        source = PublishSource(folder, "run", final)
    elif (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        source = PublishSource(folder, "model", folder)
    else:
        raise HubError(f"{folder} holds no model: expected {folder}/final/config.json (a run's output_dir), "
                       f"{folder}/config.json (a model folder) or {folder}/adapter_config.json (a peft adapter)")
    model_dir = source.model_dir
    if (model_dir / "adapter_config.json").is_file():
        source.kind = "adapter" if source.kind == "model" else "run"
        source.adapter_config = _read_json(model_dir / "adapter_config.json")
        if not list(model_dir.glob("adapter_model*.safetensors")):
            raise HubError(f"{model_dir} has adapter_config.json but no adapter_model.safetensors; save the adapter "
                           "with peft's save_pretrained (safetensors is its default)")
    else:
        source.config = _read_json(model_dir / "config.json")
        if not list(model_dir.glob("*.safetensors")):
            raise HubError(f"{model_dir} has config.json but no *.safetensors weights; save the model with "
                           "save_pretrained (safetensors is its default)")
    for path in model_files(model_dir):
        if path.suffix in PICKLE_SUFFIXES:
            raise HubError(f"{path} is a pickle file: megahf publishes safetensors only (a pickle runs code when it "
                           "is loaded); remove it, or re-save the model with save_pretrained")
    for name in RUN_FILES:
        if (folder / name).is_file():
            source.extras[name] = folder / name
    if (folder / "metrics.json").is_file():
        source.metrics = _read_json(folder / "metrics.json")
    if (folder / "results.json").is_file():
        source.results = _read_json(folder / "results.json")
    if (folder / "recipe.yaml").is_file():
        source.recipe = _read_yaml(folder / "recipe.yaml")
    for path in sorted((folder / "eval").glob("*.json")):
        source.evaluations[f"eval/{path.name}"] = _read_json(path)
        source.extras[f"eval/{path.name}"] = path
    for candidate in (folder / "conversion.json", model_dir / "conversion.json"):
        if candidate.is_file():
            source.conversion = _read_json(candidate)
            source.extras["conversion.json"] = candidate
            break
    return source


def model_files(model_dir: Path) -> list[Path]:
    """The files of the model folder that are published: all but hidden files, README.md (the card replaces it)
    and *.py (megahf's models get the flattened code; other models keep theirs, see `stage`)."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
                  and p.name != "README.md")


def is_hub_id(name: Any) -> bool:
    """A name that reads as a Hub repo id (user/name) and is not a local path."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not Path(name).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HubError(f"cannot read {path}: {error}; fix or remove the file") from None
    if not isinstance(data, dict):
        raise HubError(f"{path} must hold a JSON object, got {type(data).__name__}; fix or remove the file")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise HubError(f"cannot read {path}: {' '.join(str(error).split())}; fix or remove the file") from None
    return data if isinstance(data, dict) else {}


__all__ = ["HubError", "PublishSource", "is_hub_id", "model_files", "read_folder"]
