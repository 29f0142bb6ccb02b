"""Checksums of a checkpoint's files, computed from the bytes as they are written (no second read of the data).

torch.distributed.checkpoint writes through a `FileSystem`'s `create_stream`; `HashingFileSystem` hands it a stream
that feeds every written byte to a digest before it goes to the file, and keeps each file's digest once the stream
is closed (following the rename of DCP's temporary `.metadata`). A writer's digests cover exactly the files this
process wrote; the few small files megahf writes itself are hashed by reading them back (`file_digest`).

What makes it nearly free: `torch.save`, which DCP calls for every tensor, computes a CRC-32 of each record for its
zip format by default, and `torch.load` never checks it (torch.serialization.set_crc32_options). While a stream of
ours is open, that record CRC is switched off, and ours, over the whole file, takes its place.

Which digest: XXH3-128 (the `xxhash` package, which `datasets` already depends on). A flipped byte, or any other
damage, goes unnoticed with a chance of 2^-128; it hashes at several GB/s on one core (about 3x zlib's CRC-32 here),
so that on the helper thread it finishes before the write it overlaps (`python scripts/bench/checkpoint_checksum.py`
compares it with CRC-32, sha256, blake2b, sha1 and md5; README "Checksums"). A cryptographic hash would buy nothing
here, since whoever can edit a checkpoint's files can rewrite the marker too (crafted files are the safe reader's
business: `safe_checkpoint_reader.py`). The resume check reads markers of format 2 (sha256) and 3 (CRC-32) too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.utils.serialization import config as torch_serialization_config

CHECKSUM = "xxh3_128"  # the marker key of each file's checksum in format 4
_CHUNK = 8 << 20


class _Crc32:
    """`zlib.crc32` with hashlib's update/hexdigest interface."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def new_digest(name: str = CHECKSUM):
    """A digest with hashlib's update/hexdigest interface: "xxh3_128" (or another xxhash), "crc32", or hashlib's."""
    if name.startswith("xxh"):
        return getattr(xxhash, name)()
    return _Crc32() if name == "crc32" else hashlib.new(name)


def file_digest(path: str | os.PathLike, name: str = CHECKSUM) -> str:
    digest = new_digest(name)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_OVERLAP_BYTES = 1 << 20  # from this size on, a buffer is checksummed on a second thread while it is written


class _HashingStream(io.RawIOBase):
    """A binary file opened for writing whose every written byte also goes to `digest`. A large buffer is
    checksummed by a helper thread while this one writes it (xxhash, zlib and file writes release the GIL), and the
    call returns once both are done, so the buffer is never read after `write` returns."""

    def __init__(self, raw, digest):
        super().__init__()
        self.raw, self.digest = raw, digest
        self._helper = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if memoryview(data).nbytes < _OVERLAP_BYTES:
            self.digest.update(data)
            return self.raw.write(data)
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megahf-checksum")
        pending = self._helper.submit(self.digest.update, data)
        try:
            return self.raw.write(data)
        finally:
            pending.result()

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None
        super().close()

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()


_record_crc_lock = threading.Lock()
_record_crc_users = 0  # streams of ours open now, in any thread (DCP may write from several; async saves too)
_record_crc_before = True


@contextlib.contextmanager
def _torch_record_crc_off():
    """torch.save without its per-record CRC-32 while any of our streams is open (the global setting is restored
    when the last one closes): our checksum covers the same bytes, and torch.load does not read theirs."""
    global _record_crc_users, _record_crc_before
    with _record_crc_lock:
        if _record_crc_users == 0:
            _record_crc_before = torch_serialization_config.save.compute_crc32
            torch_serialization_config.save.compute_crc32 = False
        _record_crc_users += 1
    try:
        yield
    finally:
        with _record_crc_lock:
            _record_crc_users -= 1
            if _record_crc_users == 0:
                torch_serialization_config.save.compute_crc32 = _record_crc_before


class HashingFileSystem(FileSystem):
    """DCP's local file system, with the digest of every file written through it in `digests` ({path: hex})."""

    def __init__(self, name: str = CHECKSUM):
        super().__init__()
        self.name = name
        self.digests: dict[str, str] = {}
        self._lock = threading.Lock()  # DCP may write several files from threads

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with _torch_record_crc_off(), super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw, new_digest(self.name))
            try:
                yield stream
            finally:
                stream.close()  # ends the helper thread (DCP closes it too; closing twice is harmless)
            with self._lock:
                self.digests[str(Path(path))] = stream.digest.hexdigest()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if str(Path(path)) in self.digests:
                self.digests[str(Path(new_path))] = self.digests.pop(str(Path(path)))


__all__ = ["CHECKSUM", "HashingFileSystem", "file_digest", "new_digest"]
