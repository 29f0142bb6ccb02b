"""Index arrays cached as .npy files, keyed by the md5 of a JSON description of everything they depend on.

Megatron-Core names its cache files by an md5 of the settings and reuses whatever it finds under that name. Here the
description itself is written next to the arrays, last (so its presence marks a complete write), and compared on
load: a stale, half-written or unreadable cache is rebuilt with a warning instead of being reused silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ..atomic import atomic_write, atomic_write_text


def description_key(description_json: str) -> str:
    """md5 of a description; names the cache files."""
    return hashlib.md5(description_json.encode("utf-8")).hexdigest()


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
        atomic_write(paths[name], lambda f, array=array: np.save(f, array, allow_pickle=False))
    atomic_write_text(paths["description"], description_json)  # last: marks a complete write
    return arrays, paths, False
