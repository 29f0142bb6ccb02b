"""Atomic writes: every file and folder megahf writes appears under its name complete, or not at all.

A file is written under a hidden temporary name in the same folder and renamed over its destination (a rename within
one file system is atomic); a folder is filled under a hidden name and renamed into place the same way. With
`durable=True` the data and the rename are fsynced, for what must survive a power loss (checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import explain_write_errors


def temporary_name(path: str | os.PathLike, tag: str = "partial", per_process: bool = True) -> str:
    """A hidden name next to `path` (same folder, so renaming it is atomic), unique to this process unless
    `per_process=False` (a folder that all ranks of a launch write into together)."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.{tag}" + (f"-{os.getpid()}" if per_process else ""))


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], durable: bool = False) -> None:
    """Call `write(f)` on a binary file that becomes `path` only once `write` has returned. A full disk or an
    unwritable folder raises `megahf.errors.OutputWriteError` naming `path`."""
    tmp = temporary_name(path)
    intact = f"the previous {os.fspath(path)} is intact" if os.path.lexists(path) else "nothing was written"
    with explain_write_errors(path, intact=intact):
        try:
            with open(tmp, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
    if durable:
        fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=durable)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = None, durable: bool = False) -> None:
    text = json.dumps(data, indent=indent) + ("\n" if indent is not None else "")
    atomic_write_text(path, text, durable=durable)


def publish_folder(partial: str | os.PathLike, final: str | os.PathLike, replace: bool = True,
                   durable: bool = False) -> bool:
    """Rename the finished folder `partial` to `final`. An existing `final` is replaced (moved aside first, so that
    `final` is never missing for longer than two renames), or with `replace=False` kept, `partial` being deleted
    (another process published an identical copy first). Returns whether `partial` became `final`."""
    partial, final = Path(partial), Path(final)
    if final.exists() and not replace:
        shutil.rmtree(partial, ignore_errors=True)
        return False
    old = Path(temporary_name(final, tag="old"))
    if final.exists():
        final.rename(old)
    try:
        partial.rename(final)
    except OSError:
        if replace:
            if old.exists():
                old.rename(final)
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process renamed its identical copy first
        return False
    shutil.rmtree(old, ignore_errors=True)
    if durable:
        fsync_dir(final.parent)
    return True


__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_file", "publish_folder",
           "temporary_name"]
