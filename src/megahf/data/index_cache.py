"""Index arrays cached as .npy files, keyed by the md5 of a JSON description of everything they depend on.

Megatron-Core names its cache files by an md5 of the settings and reuses whatever it finds under that name. Here the
description itself is written next to the arrays, last (so its presence marks a complete write), and compared on
load: a stale, half-written or unreadable cache is rebuilt with a warning instead of being reused silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence

import numpy as np


def description_key(description_json: str) -> str:
    """md5 of a description; names the cache files."""
    return hashlib.md5(description_json.encode("utf-8")).hexdigest()


def _atomic_write(path: str, write: Callable) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(path: str, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_or_build(
    folder: str | os.PathLike | None,
    label: str,
    description_json: str,
    names: Sequence[str],
    build: Callable[[], tuple],
    valid: Callable[..., bool],
) -> tuple[tuple, dict[str, str] | None, bool]:
    """The arrays `names` from `folder` when its cache matches `description_json` and `valid(*arrays)` holds,
    else `build()` (a tuple in the order of `names`), saved there. Returns (arrays, cache paths, loaded).
    Without a folder nothing is cached."""
    if not folder:
        return build(), None, False
    base = os.path.join(os.fspath(folder), f"{description_key(description_json)}-{label}")
    paths = {"description": base + "-description.json", **{name: f"{base}-{name}.npy" for name in names}}
    if os.path.isfile(paths["description"]):
        try:
            with open(paths["description"], encoding="utf-8") as f:
                matches = json.load(f) == json.loads(description_json)
            arrays = tuple(np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names)
            if matches and valid(*arrays):
                return arrays, paths, True
        except (OSError, ValueError):
            pass
        warnings.warn(
            f"index cache {paths['description']} does not match this dataset or is unreadable; rebuilding",
            stacklevel=3,
        )
    arrays = build()
    os.makedirs(folder, exist_ok=True)
    for name, array in zip(names, arrays):
        atomic_save(paths[name], array)
    atomic_write_text(paths["description"], description_json)  # last: marks a complete write
    return arrays, paths, False
