"""The error of `megahf preprocess` and of its parts (reader, tokenizer, writer), kept below all of them."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import MegahfError


class PreprocessError(MegahfError, ValueError):
    """Bad input to `megahf preprocess`; the message names the file, the key and the fix."""


def missing_key_message(key: str, where: str, keys_present: Sequence[str]) -> str:
    """The one message for a record without the key that holds its text, wherever the record was read."""
    present = ", ".join(repr(k) for k in keys_present) or "none"
    return (
        f"{where}: no key {key!r} (keys present: {present}); pass the key(s) holding the text with "
        f"--json-keys"
    )


def check_arguments(keys: Sequence[str], workers: int, output_prefix: str) -> None:
    """The checks of `megahf preprocess`'s own options that need no file: keys, workers, the output prefix."""
    if not keys:
        raise PreprocessError("--json-keys: give at least one key")
    if workers < 1:
        raise PreprocessError(f"--workers {workers}: need at least 1")
    if not output_prefix or output_prefix.endswith(("/", os.sep)):
        raise PreprocessError(f"--output-prefix {output_prefix!r}: give a file prefix such as data/my, not a folder")


__all__ = ["PreprocessError", "check_arguments", "missing_key_message"]
