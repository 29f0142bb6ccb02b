"""The error of `megahf preprocess` and of its parts (reader, tokenizer, writer), kept below all of them."""

from __future__ import annotations

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


__all__ = ["PreprocessError", "missing_key_message"]
