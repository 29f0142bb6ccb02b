"""Safetensors files as the Hub wants them: counted from their headers (no torch, no loading) and, when a file is
larger than the shard size, rewritten as shards with an index, as `save_pretrained(max_shard_size=...)` writes them.

transformers 5 saves up to 50 GB in one file; `megahf push --max-shard-size 5GB` (the default) keeps every file
small enough to download and resume piecewise.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from ..errors import MegahfError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers'; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise MegahfError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_header(path: Path) -> dict:
    """The safetensors header: tensor name -> {dtype, shape, data_offsets}, plus "__metadata__"."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise MegahfError(f"{path} is not a readable safetensors file ({error}); re-save the model") from None


def count_parameters(files: list[Path]) -> int:
    """Elements of every tensor in the files (tied weights are saved once, so each counts once)."""
    return sum(math.prod(info["shape"]) for path in files for name, info in read_header(path).items()
               if name != "__metadata__")


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    return {name: info["shape"] for path in files for name, info in read_header(path).items()
            if name != "__metadata__"}


def needs_resharding(files: list[Path], max_bytes: int) -> bool:
    return any(path.stat().st_size > max_bytes for path in files)


def plan_shards(files: list[Path], max_bytes: int, prefix: str = "model") -> dict[str, list[str]]:
    """Shard file name -> the tensors it will hold, in the files' order: at most `max_bytes` of tensor data per
    shard (a tensor larger than that gets a shard of its own). From the headers alone."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, (_, size) in _tensor_sizes(files).items():
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    n = len(groups)
    return {f"{prefix}-{i:05d}-of-{n:05d}.safetensors": group for i, group in enumerate(groups, start=1)}


def reshard(files: list[Path], out_dir: Path, max_bytes: int, prefix: str = "model") -> list[str]:
    """Rewrite the tensors of `files` as the shards of `plan_shards` plus `prefix.safetensors.index.json`, as
    `save_pretrained(max_shard_size=...)` lays them out; return the names written. Holds one shard in memory at a
    time (torch is imported here only)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sizes = _tensor_sizes(files)
    weight_map = {}
    for shard, group in plan_shards(files, max_bytes, prefix).items():
        tensors = {}
        for name in group:
            with safe_open(str(sizes[name][0]), framework="pt") as f:
                tensors[name] = f.get_tensor(name)
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": sum(size for _, size in sizes.values())}, "weight_map": weight_map}
    index_name = f"{prefix}.safetensors.index.json"
    (out_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [*dict.fromkeys(weight_map.values()), index_name]


def _tensor_sizes(files: list[Path]) -> dict[str, tuple[Path, int]]:
    """Tensor name -> (its file, its bytes)."""
    return {name: (path, math.prod(info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 4))
            for path in files for name, info in read_header(path).items() if name != "__metadata__"}


__all__ = ["count_parameters", "needs_resharding", "parse_size", "plan_shards", "read_header", "reshard",
           "tensor_shapes"]
