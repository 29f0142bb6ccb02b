"""What a push uploads: path in the repo -> local file. Files that megahf writes (the card, config.json with
`auto_map`, the flattened model code, re-sharded weights, an adapter_config.json naming its Hub base model) are
written into a temporary folder; everything else is uploaded from where it is. FOLDER itself is never written.

    with staged(read_folder("runs/gpt-tiny"), StageOptions(repo_id="me/gpt-tiny")) as stage:
        stage.files      # {"README.md": tmp/README.md, "model.safetensors": runs/gpt-tiny/final/model.safetensors, ...}
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .card import CardOptions, render_card
from .folder import PublishSource, model_files
from .remote_code import auto_map, write_remote_code
from .shards import count_parameters, needs_resharding, plan_shards, reshard

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class StageOptions:
    repo_id: str | None = None
    revision: str | None = None
    license: str = "apache-2.0"
    base_model: str | None = None
    max_shard_bytes: int = 5 * 10**9
    write_weights: bool = True  # False (megahf card): list the shards a push would write, write none


@dataclass
class Staged:
    files: dict[str, Path]  # path in repo -> local file
    card: str
    weight_files: list[str]  # the safetensors files and index (stale ones on the Hub are deleted)


@contextlib.contextmanager
def staged(source: PublishSource, options: StageOptions) -> Iterator[Staged]:
    with tempfile.TemporaryDirectory(prefix="megahf-hub-") as tmp:
        yield stage_into(source, options, Path(tmp))


def stage_into(source: PublishSource, options: StageOptions, tmp: Path) -> Staged:
    model_dir = source.model_dir
    files: dict[str, Path] = {}
    family = source.family
    local = model_files(model_dir)
    weights = [p for p in local if p.suffix == ".safetensors" and p.parent == model_dir]
    weight_index = [p for p in local if p.name.endswith(".safetensors.index.json") and p.parent == model_dir]
    parameters = count_parameters(weights)
    reshaped = (not source.is_adapter) and needs_resharding(weights, options.max_shard_bytes)
    for path in local:
        name = path.relative_to(model_dir).as_posix()
        if family is not None and (path.suffix == ".py" or name == "config.json"):
            continue  # written below
        if reshaped and (path in weights or path in weight_index):
            continue
        files[name] = path
    if reshaped and options.write_weights:
        for name in reshard(weights, tmp, options.max_shard_bytes):
            files[name] = tmp / name
    elif reshaped:  # the card lists the names only
        for name in [*plan_shards(weights, options.max_shard_bytes), "model.safetensors.index.json"]:
            files[name] = tmp / name
    if family is not None:
        for name in write_remote_code(family, tmp):
            files[name] = tmp / name
        config = dict(source.config)
        config["auto_map"] = auto_map(family)
        _write_json(tmp / "config.json", config)
        files["config.json"] = tmp / "config.json"
    if source.is_adapter and options.base_model:
        adapter = dict(source.adapter_config)
        adapter["base_model_name_or_path"] = options.base_model
        _write_json(tmp / "adapter_config.json", adapter)
        files["adapter_config.json"] = tmp / "adapter_config.json"
    for name, path in source.extras.items():
        files.setdefault(name, path)
    names = sorted([*files, "README.md"])
    card = render_card(source, CardOptions(repo_id=options.repo_id, revision=options.revision,
                                           license=options.license, base_model=options.base_model,
                                           parameters=parameters, files=names))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    files["README.md"] = tmp / "README.md"
    weight_files = sorted(n for n in files if n.endswith((".safetensors", ".safetensors.index.json")))
    return Staged(files=dict(sorted(files.items())), card=card, weight_files=weight_files)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "StageOptions", "Staged", "stage_into", "staged"]
