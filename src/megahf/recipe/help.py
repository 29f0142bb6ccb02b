"""Recipe fields carry their help text as `HfArgumentParser` reads it: `field(metadata={"help": ...})`."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def arg(text: str, **kwargs) -> Any:
    """A dataclass field with its help text (and `default=` or `default_factory=`)."""
    return field(metadata={"help": text}, **kwargs)


__all__ = ["arg"]
