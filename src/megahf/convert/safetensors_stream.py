"""Write a .safetensors file one tensor at a time, and read one lazily.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets),
then the tensors' bytes back to back. Every offset follows from the shapes and dtypes alone, so the header is written
first and each tensor is produced, written and dropped in turn: the file never needs the whole model in memory (the
`safetensors` package's `save_file` takes a dict of every tensor at once).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .common import Block, ConversionError, TensorRef

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, TensorRef], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> None:
    """Write `tensors` to `path`, reading each `TensorRef` only when its bytes are due. The header's metadata is
    `metadata` exactly where given (a strict reader such as nanotron's refuses any other key), else transformers'
    {"format": "pt"}."""
    metadata = {"format": "pt"} if metadata is None else metadata
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, ref in tensors.items():
        if ref.dtype not in DTYPES:
            raise ConversionError(f"{name}: dtype {ref.dtype} cannot be stored in safetensors")
        size = ref.nbytes()
        header[name] = {"dtype": DTYPES[ref.dtype], "shape": list(ref.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, ref in tensors.items():
            tensor = ref.load()
            if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
                raise ConversionError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, announced "
                                      f"{tuple(ref.shape)} {ref.dtype} (a converter bug)")
            f.write(_bytes_of(tensor))
            if on_tensor is not None:
                on_tensor(name)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


def read_safetensors(paths: list[Path]) -> dict[str, TensorRef]:
    """Every tensor of one or more .safetensors files, each read on demand (memory-mapped by safetensors)."""
    refs: dict[str, TensorRef] = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sliced = f.get_slice(name)
                dtype = _torch_dtype(sliced.get_dtype())
                refs[name] = TensorRef(tuple(sliced.get_shape()), dtype, _loader(path, name),
                                       _block_loader(path, name))
    return refs


def _loader(path: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return load


def _block_loader(path: Path, name: str) -> Callable[[Block], torch.Tensor]:
    def load_block(block: Block) -> torch.Tensor:  # only the block's bytes are read from the file
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(name)[block]
    return load_block


def _torch_dtype(name: str) -> torch.dtype:
    for dtype, code in DTYPES.items():
        if code == name:
            return dtype
    raise ConversionError(f"safetensors dtype {name} is not supported")


__all__ = ["read_safetensors", "write_safetensors"]
