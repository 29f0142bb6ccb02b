"""The one place where megahf unpickles a checkpoint's files, none of them able to run code.

torch.distributed.checkpoint's `FileSystemReader` loads `.metadata` with plain `pickle.load`, and its default planner
loads every byte record (optimizer param groups, any non-tensor value) with `torch.load(weights_only=False)`: a
checkpoint with a crafted `__reduce__` in either runs it on resume. `SafeFileSystemReader` changes only those two
loads: the metadata goes through `MetadataUnpickler`, which builds exactly the classes DCP's `Metadata` is made of and
refuses any other global; a byte record is loaded with `weights_only=True` before the planner sees it. Tensors were
already loaded with `weights_only=True` by torch. Every refusal is an `UnsafePickleError` that names the file.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

# The globals a DCP `.metadata` references (listed from a real checkpoint with pickletools / a tracing find_class),
# and nothing else; plus torch's dtypes (below). Each is a data class, an enum, or a lookup by name: building one
# cannot touch the file system. `pathlib._local` is where Python 3.13+ defines PosixPath.
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id, as DCP saw it
})


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint file that would need more than plain data to be unpickled: refused, nothing of it run."""


def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata`, building only the allow-listed classes (`allowed`: a subclass may add some)."""

    allowed = _METADATA_GLOBALS

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(f"it references {module}.{name}, which is not part of torch.distributed.checkpoint's "
                                "metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("it holds a persistent id, which DCP metadata never does")


def load_metadata(stream: IO[bytes], name: str, unpickler: type[MetadataUnpickler] = MetadataUnpickler) -> Metadata:
    """The `Metadata` pickled in `stream` (the file `name`), refused unless it is plain DCP metadata."""
    try:
        metadata = unpickler(stream).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{name} refused: {error}") from None
    except Exception as error:  # a damaged pickle fails in many ways (EOFError, ValueError, KeyError, ...)
        raise UnsafePickleError(f"{name} is not a readable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnsafePickleError(f"{name} refused: it holds a {type(metadata).__name__}, not DCP metadata")
    for info in metadata.storage_data.values():
        file = getattr(info, "relative_path", None)
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise UnsafePickleError(f"{name} refused: it points at {file!r}, not a file of its own folder")
    return metadata


def _weights_only_reason(error: Exception) -> str:
    """The useful line of torch's weights_only refusal (the rest of torch's message advises weights_only=False)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text.split(" was not an allowed global")[0] + (" (not plain data)" if "global" in text else "")


def load_weights_only(source: str | os.PathLike | IO[bytes], name: str) -> Any:
    """`torch.load(source, weights_only=True)` on the CPU; `UnsafePickleError` naming `name` if refused or damaged."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except OSError:  # cannot be read: not a refusal
        raise
    except Exception as error:
        raise UnsafePickleError(f"{name} refused: {_weights_only_reason(error)}") from None


class _WeightsOnlyBytes:
    """Stands in for the load planner while a byte record is read: the record is loaded with weights_only=True and
    saved again, so that the planner's own `torch.load(weights_only=False)` only ever sees bytes megahf produced
    from plain data. Everything else is the planner's."""

    def __init__(self, planner: LoadPlanner, reader: SafeFileSystemReader):
        self._planner, self._reader = planner, reader

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        file = self._reader.storage_data[read_item.storage_index].relative_path
        name = f"{_display_name(Path(self._reader.path) / file)} (record {read_item.storage_index.fqn})"
        record = load_weights_only(value, name)
        clean = io.BytesIO()
        torch.save(record, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._planner, attribute)


class SafeFileSystemReader(FileSystemReader):
    """torch's `FileSystemReader` with its two unpickling steps made safe (see the module docstring)."""

    unpickler: type[MetadataUnpickler] = MetadataUnpickler

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # torch's read_metadata with pickle.load replaced; the rest as torch 2.13 does it.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, _display_name(path), self.unpickler)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self))


def _display_name(path: str | os.PathLike) -> str:
    """`model_optim/.metadata` style: the folder and the file, enough to find it inside a checkpoint."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _byte_records(metadata: Metadata) -> Iterator[ReadItem]:
    for index in metadata.storage_data:
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            yield ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size(),
                           storage_index=index, storage_offsets=torch.Size(), lengths=torch.Size())


class _Discard:
    """A planner that keeps nothing: what `check_dcp_folder` reads is only checked."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        pass


def check_dcp_folder(folder: str | os.PathLike) -> None:
    """Read a DCP folder's metadata and every byte record the way a load would, without loading any tensor:
    `UnsafePickleError` names the first file refused. Cheap: byte records are the small non-tensor values."""
    reader = SafeFileSystemReader(folder)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    reader.read_data(LoadPlan(list(_byte_records(metadata))), _Discard()).wait()


__all__ = ["MetadataUnpickler", "SafeFileSystemReader", "UnsafePickleError", "check_dcp_folder",
           "load_metadata", "load_weights_only"]
